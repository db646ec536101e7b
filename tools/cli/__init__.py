"""The command lines (compile, generate, serve, inspect, bench, simulate), each run by ``tools/shell``."""
