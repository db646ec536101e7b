"""The command lines (compile, generate, inspect, bench, simulate), each run by ``tools/shell``."""
