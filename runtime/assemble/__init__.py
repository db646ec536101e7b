"""``runtime.load``: a compiled directory checked and assembled into a running model."""
