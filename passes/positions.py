"""Per-sequence positions: the rotary tables read a `positions` input instead of `arange(T)`.

Looks for the [1, T] position tensors that the skeleton found feeding the rotary cos/sin
(HF: `arange(T) + 0` then `unsqueeze(0)`; the reference Llama: `arange(T).unsqueeze(0)`).
Puts a new graph input `positions` [B, T] (int64) in their place, so that a sequence with
cache_len tokens cached sees positions cache_len + i, and a tree node sees cache_len + depth.
Invariant: no rotary table depends on an arange any more.
"""

from __future__ import annotations

import torch
from torch import fx

from specc.passes.graph_utils import LINEAR, RecognitionError, ancestors_until, calls
from specc.passes.skeleton import LlamaSkeleton


def add_placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """A new graph input, placed after the existing ones."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    with gm.graph.inserting_after(placeholders[-1]):
        return gm.graph.placeholder(name)


def use_position_input(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    positions = add_placeholder(gm, "positions")
    for source in skeleton.positions:
        source.replace_all_uses_with(positions)
    gm.graph.eliminate_dead_code()
    for layer in skeleton.layers:
        # the query's own path back to q_proj holds the rotary tables and their inputs
        visited, _ = ancestors_until(layer.query, lambda n: n.op == "placeholder" or calls(n, LINEAR))
        stray = [n for n in visited if calls(n, (torch.arange,))]
        if stray:
            raise RecognitionError(stray[0], "an arange still feeds the query after positions were replaced")
    return f"replaced {len(skeleton.positions)} position source(s) by input `positions` [B, T]"
