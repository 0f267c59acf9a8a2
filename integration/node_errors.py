"""Errors a ComfyUI user can act on: which node, which input, what is wrong, how to fix it."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping

from ..kernels.errors import InvalidInput


class NodeInputError(ValueError):
    """Raised by a node; ComfyUI shows the message in the error dialog and in /history."""


def input_error(node: str, input_name: str, problem: str, fix: str) -> NodeInputError:
    return NodeInputError(f"{node}: input '{input_name}': {problem}. Fix: {fix}")


def output_error(node: str, output_name: str, problem: str, fix: str) -> NodeInputError:
    """For an output built when another node first reads it: the error shows in that node's run."""
    return NodeInputError(f"{node}: output '{output_name}': {problem}. Fix: {fix}")


@contextmanager
def kernel_errors_as_node_errors(node: str, input_names: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a kernel's InvalidInput naming the node and the node input behind the kernel argument."""
    try:
        yield
    except InvalidInput as error:
        input_name = (input_names or {}).get(error.argument, error.argument)
        raise input_error(node, input_name, error.problem, error.fix) from error


def check_numbers(node: str, inputs: Mapping[str, object]) -> None:
    """Refuse NaN and infinity among a node's inputs (pass it `locals()` first thing in execute). They get past
    ComfyUI's min/max checks, since every comparison with NaN is false, and past our own range checks for the
    same reason, to fail later with a message that names something else."""
    for name, value in inputs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise input_error(node, name, f"{value} is not a number", "type a finite value within the input's range")
