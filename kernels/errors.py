"""The one error type kernels raise for bad input.

Kernels know their own argument names, not the ComfyUI node that called them; a node catches `InvalidInput`
and re-raises it with its display name and the name of its own input (see `nodes/node_errors.py`).
"""


class InvalidInput(ValueError):
    """Bad input to a kernel: which argument, what is wrong with it, and how to fix it."""

    def __init__(self, argument: str, problem: str, fix: str):
        self.argument = argument
        self.problem = problem
        self.fix = fix
        super().__init__(f"{argument}: {problem}. Fix: {fix}")
