"""The project's own error types: bad input from the user, with a message that names the flag or file:line.

Command-line entry points catch :class:`UsageError` and print its message; any other exception (a bug,
or an error inside a library) keeps its traceback.
"""


class UsageError(Exception):
    """A flag, a file or a record is wrong; the message names it and says what was expected."""


class InvalidInput(UsageError, ValueError):
    """A value is not acceptable (a flag, a record, a file's content)."""


class MissingInput(UsageError, FileNotFoundError):
    """A file or folder the user named (or the default one) does not exist."""


class IgnoredFlagWarning(UserWarning):
    """A flag was set that has no effect in the chosen configuration (the run records what was used)."""
