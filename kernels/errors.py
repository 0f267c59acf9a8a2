"""The one error type kernels raise for bad input (and its form for a file that cannot be read).

Kernels know their own argument names, not the ComfyUI node that called them; a node catches `InvalidInput`
and re-raises it with its display name and the name of its own input (see `integration/node_errors.py`).
"""

from pathlib import Path


class InvalidInput(ValueError):
    """Bad input to a kernel: which argument, what is wrong with it, and how to fix it."""

    def __init__(self, argument: str, problem: str, fix: str):
        self.argument = argument
        self.problem = problem
        self.fix = fix
        super().__init__(f"{argument}: {problem}. Fix: {fix}")


def file_error(path, problem: str, fix: str, argument: str = "file") -> InvalidInput:
    """A file that cannot be read as what it should be: names the file (not its folder: the user picked it by
    name) and what is wrong with it."""
    return InvalidInput(argument, f"{Path(path).name}: {problem}", fix)
