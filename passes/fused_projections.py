"""Fuse each layer's parallel projections: q/k/v into one linear, gate/up into one linear.

Looks for, per layer of the skeleton, the q, k and v projections and the MLP's gate and up
projections: linears that read the same normalised hidden state. In their place: one linear
over the rows of the stacked weight, cat([W_q, W_k, W_v]) (and cat([W_gate, W_up])), whose
output is split back along the last dimension, so every consumer reads exactly the slice its
projection produced before:
    linear(h, cat([W_a, W_b])) = cat([linear(h, W_a), linear(h, W_b)], -1)
Why: a decode step multiplies one token (or a tree of a few dozen) per sequence, where a
GEMM's time is mostly its launch and ramp, not its bytes; one wider GEMM replaces three
(two). On SmolLM2-135M at batch 1 the step ran 7 GEMMs per layer, about 3.5 µs each.

The stacked weights are copies held by the program (non-persistent buffers `fused_qkv_<i>`,
`fused_gate_up_<i>`; `STACKED_SOURCES` on the module names the weights each one stacks).
`refresh_stacked_weights` copies the model's current weights into them in place, which
specc.generate does before every call, so weights changed after compiling are still used.
The copies cost the memory of those projections once more; turn the pass off with
specc.backend(fuse_projections=False) when memory is short.

A group is left as it was when its linears do not share the input, carry a bias, or differ in
dtype, device or input width. Invariant afterwards, checked right after the rewrite by counting
linears: every fused q/k/v group is one linear where it was three, every gate/up group one
where it was two.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from specc.passes.graph_utils import LINEAR, RecognitionError, arg, calls
from specc.passes.skeleton import LlamaSkeleton

STACKED_SOURCES = "_specc_stacked_sources"  # module attribute: stacked buffer -> the weight attributes it stacks


def _weight_of(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor:
    weight = arg(linear, 1, "weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        raise RecognitionError(linear, "its weight is not a program attribute; run set_program_signature first")
    return getattr(gm, weight.target)


def _has_bias(linear: fx.Node) -> bool:
    return arg(linear, 2, "bias") is not None


def _fuse_group(gm: fx.GraphModule, linears: list[fx.Node], name: str) -> bool:
    """Replace `linears` (same input, no bias) by one linear and a split; False when they
    cannot be fused (different inputs, a bias), leaving the graph as it was."""
    graph = gm.graph
    source = arg(linears[0], 0, "input")
    if any(arg(n, 0, "input") is not source for n in linears) or any(_has_bias(n) for n in linears):
        return False
    weights = [_weight_of(gm, n) for n in linears]
    if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) != 1:
        return False
    with torch.no_grad():
        gm.register_buffer(name, torch.cat([w.detach() for w in weights], dim=0), persistent=False)
    gm.__dict__.setdefault(STACKED_SOURCES, {})[name] = [arg(n, 1, "weight").target for n in linears]
    first = min(linears, key=lambda n: list(graph.nodes).index(n))
    with graph.inserting_before(first):
        fused_weight = graph.get_attr(name)
        fused = graph.call_function(torch._C._nn.linear, (source, fused_weight))
        parts = graph.call_function(torch.split, (fused, [int(w.shape[0]) for w in weights]), {"dim": -1})
        pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
    for old, new in zip(linears, pieces):
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    return True


def refresh_stacked_weights(gm: fx.GraphModule) -> None:
    """Copy the weights each stacked buffer stacks into it, in place (its storage, which a
    captured CUDA graph reads, stays the same)."""
    with torch.no_grad():
        for name, parts in gm.__dict__.get(STACKED_SOURCES, {}).items():
            torch.cat([getattr(gm, part) for part in parts], dim=0, out=getattr(gm, name))


def fuse_parallel_projections(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    graph = gm.graph
    linears_before = sum(1 for n in graph.nodes if calls(n, LINEAR))
    fused = {"qkv": 0, "gate_up": 0}
    for index, layer in enumerate(skeleton.layers):
        groups = {"qkv": [layer.q_proj, layer.k_proj, layer.v_proj], "gate_up": [layer.gate_proj, layer.up_proj]}
        for group, linears in groups.items():
            if _fuse_group(gm, linears, f"fused_{group}_{index}"):
                fused[group] += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()

    # invariant: each fused q/k/v group removed two linears, each gate/up group one
    linears_after = sum(1 for n in graph.nodes if calls(n, LINEAR))
    expected = linears_before - 2 * fused["qkv"] - fused["gate_up"]
    if linears_after != expected:
        raise RecognitionError(None, f"{linears_after} linears after fusing projections; expected {expected}")
    layers = len(skeleton.layers)
    return (
        f"fused q/k/v into one linear in {fused['qkv']} of {layers} layers and gate/up in {fused['gate_up']} of "
        f"{layers}; {linears_before} linears became {linears_after} (stacked weights held as program buffers)"
    )
