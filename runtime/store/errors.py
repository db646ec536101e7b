"""The error a compiled directory, device or budget gives: its own module, so that every reader of
a directory (``manifest.py``, ``digest.py``, ...) raises it without importing another."""


class LoadError(ValueError):
    """The compiled directory, device or budget is unusable; the message says what to do."""
