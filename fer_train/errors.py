"""The two kinds of error a user can fix, which the command line reports in one line (exit status 2):
a bad setting or path, and data that cannot be read as it is on disk. Anything else is a bug and keeps
its traceback."""

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A bad configuration value, file or path; raised before any work starts."""


class DataError(ValueError):
    """A data set or file cannot be read as it is on disk; the message names the file (and line) and what to do."""
