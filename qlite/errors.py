class QliteError(Exception):
    """The one error type of qlite. Its message names the file, tensor or option at fault;
    the CLI prints it as a single line and exits non-zero."""


class QliteWarning(UserWarning):
    """Something works, but not as well as it could (e.g. a slower fallback path); the CLI
    prints it as a single line."""
