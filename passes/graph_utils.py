"""Small helpers for reading Dynamo's torch-IR graphs: what a node calls, its example value."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx


class RecognitionError(Exception):
    """The graph is not a Llama skeleton specc understands; names the node and the reason."""

    def __init__(self, node: fx.Node | None, reason: str) -> None:
        where = f"node '{node.name}' ({describe(node)})" if node is not None else "graph"
        super().__init__(f"{where}: {reason}")
        self.node = node
        self.reason = reason


LINEAR = (torch._C._nn.linear, F.linear)
EMBEDDING = (F.embedding, torch.embedding)
SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)


def describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return f"{node.op} {name}"


def calls(node: fx.Node, targets: Iterable[Callable] | str) -> bool:
    """True when node calls one of `targets` (functions), or the method named `targets`."""
    if isinstance(targets, str):
        return node.op == "call_method" and node.target == targets
    return node.op == "call_function" and node.target in tuple(targets)


def calls_any_of(node: fx.Node, functions: Iterable[Callable], method: str) -> bool:
    return calls(node, functions) or calls(node, method)


def example_value(node: fx.Node):
    """Dynamo's fake value for the node (a FakeTensor, SymInt or tuple), or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: fx.Node) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def ancestors_until(node: fx.Node, stop: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Walk inputs backwards from `node`; returns (visited, stopping nodes), not crossing stops."""
    visited: set[fx.Node] = set()
    stops: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current in visited or current in stops:
            continue
        if stop(current):
            stops.add(current)
            continue
        visited.add(current)
        todo.extend(current.all_input_nodes)
    return visited, stops


def users_until(node: fx.Node, stop: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Walk users forwards from `node`; returns (visited, stopping nodes), not crossing stops."""
    visited: set[fx.Node] = set()
    stops: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        current = todo.pop()
        if current in visited or current in stops:
            continue
        if stop(current):
            stops.add(current)
            continue
        visited.add(current)
        todo.extend(current.users)
    return visited, stops
