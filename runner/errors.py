"""The one kind of failure the runner expects and reports without a traceback."""

from __future__ import annotations

EXIT_USAGE = 2  # bad usage or a pre-flight check failed: nothing was run


class RunnerError(Exception):
    """A failure the user can act on. Its message is one or more complete lines (each printed as
    "mv4d-batch: <line>"); exit_code is what the command ends with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
