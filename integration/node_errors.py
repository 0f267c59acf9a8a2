"""Errors a ComfyUI user can act on: which node, which input, what is wrong, how to fix it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from ..kernels.errors import InvalidInput


class NodeInputError(ValueError):
    """Raised by a node; ComfyUI shows the message in the error dialog and in /history."""


def input_error(node: str, input_name: str, problem: str, fix: str) -> NodeInputError:
    return NodeInputError(f"{node}: input '{input_name}': {problem}. Fix: {fix}")


@contextmanager
def kernel_errors_as_node_errors(node: str, input_names: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a kernel's InvalidInput naming the node and the node input behind the kernel argument."""
    try:
        yield
    except InvalidInput as error:
        input_name = (input_names or {}).get(error.argument, error.argument)
        raise input_error(node, input_name, error.problem, error.fix) from error
