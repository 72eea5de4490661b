"""Rotary fusion: each layer's q and k rotation moves into specc::tree_attention and kv_write.

Looks for, in the arguments of the ops that the kv_cache pass inserted, the Llama rotation
    x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin             (either operand order)
of the query (tree_attention's q) and of the key (kv_write's k), with cos/sin broadcast over
heads ([B or 1, 1, T, D] or [T, D]). In its place: the op gets x, the projection before its
rotation, and the tables as rope_cos/rope_sin [B or 1, T, D] (lowering/rotary.py), and rotates
as it loads. The rotated q and k were each an elementwise kernel of their own (Inductor cannot
fuse a producer into an opaque op), two launches per layer; the tables are one buffer for all
layers. The rotation is hand-matched rather than written as a traced pattern: Dynamo spells
the half width as a constant and the slices as getitem tuples, which a traced pattern does
not reproduce.

Invariant: an op whose operand is rewritten reads the same x and tables as the rotation did,
with the rotation's dtype; an operand that is not such a rotation is left alone (the op then
gets no tables), so the pass never changes what a graph computes, only where it rotates.
SPECC_FUSE_ROTARY=0 turns the pass off (the rotation then stays in Inductor's kernels).
"""

from __future__ import annotations

import operator

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
from torch import fx

from specc.lowering import kv_write, tree_attention  # noqa: F401  (registers the ops)
from specc.lowering.registry import env_choice
from specc.passes.graph_utils import RecognitionError, arg, calls, calls_any_of, example_value
from specc.passes.skeleton import LlamaSkeleton

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_NEG = (operator.neg, torch.neg)
_CAT = (torch.cat, torch.concat, torch.concatenate)


def fuse_rotary_default() -> bool:
    """SPECC_FUSE_ROTARY (default 1): rotate q and k inside the attention ops."""
    return env_choice("SPECC_FUSE_ROTARY", "1", {"1": "rotate in the kernels",
                                                  "0": "rotate in Inductor's kernels"}) == "1"


def share_tables_default() -> bool:
    """SPECC_SHARE_ROTARY_TABLES=1: every op reads the model's cos/sin tables from one buffer.

    Llama computes its tables once per forward and each layer unsqueezes them for its heads.
    Inductor treats a table as cheap to recompute (one read: the positions), and an opaque op
    that needs fixed strides gets a copy of such a value of its own. In plain decode that is a
    kernel per four layers, each writing the tables of four layers (8 of a step's 314 kernels on
    the real model, about 1.4 µs each; H100, results/2026-12-06c_h100). The verify pass of the
    speculative step shows no such kernels in the same profile (its tables also read the tree's
    depths, and Inductor computes a value of more than one read once: likely why, not checked).
    With the switch, one stride-fixing node per table (Inductor's inductor_force_stride_order,
    value-preserving) makes Inductor compute it into one buffer that every op reads: on the CPU,
    one kernel instead of one per four layers. The fp32 GPU equivalence tests passed with it
    (results/2026-12-06e_h100, call 1). Timed side by side on an H100 (results/2026-12-07b_h100,
    scripts/step_variants.py, prompt 0): plain 307 kernels against 314, span 930.6 µs against
    945.6 (the defaults ran first; earlier runs took 939.9-944.2); the speculative step 1,220.9
    against 1,219.9. Off by default: the speculative step does not gain."""
    return env_choice("SPECC_SHARE_ROTARY_TABLES", "0", {"1": "one table buffer for every op",
                                                          "0": "Inductor's copy per op"}) == "1"


def _head_unsqueezed(table: fx.Node) -> fx.Node | None:
    """x when table is x.unsqueeze(1) with x [B or 1, T, D], else None."""
    if not calls_any_of(table, (torch.unsqueeze,), "unsqueeze"):
        return None
    base = table.args[0] if table.args else None
    value = example_value(base) if isinstance(base, fx.Node) else None
    if arg(table, 1, "dim") not in (1, -3) or not isinstance(value, torch.Tensor) or value.dim() != 3:
        return None
    return base


def _shared_table(graph: fx.Graph, base: fx.Node, shared: dict[fx.Node, fx.Node]) -> fx.Node:
    """base, computed into one buffer of fixed strides (one node per base)."""
    if base not in shared:
        with graph.inserting_after(base):
            stride = graph.call_method("stride", (base,))
        with graph.inserting_after(stride):
            fixed = graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (base, stride))
        fixed.meta["example_value"] = example_value(base)
        shared[base] = fixed
    return shared[base]


def _operands(node: fx.Node, functions: tuple, method: str) -> tuple | None:
    """(a, b) of a binary call `a op b`, as function or method, with no other arguments."""
    if calls(node, functions) and len(node.args) == 2 and not node.kwargs:
        return node.args
    if calls(node, method) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _half_slice(node, source: fx.Node, half: int, upper: bool) -> bool:
    """node is source[..., half:] (upper) or source[..., :half]."""
    if not (isinstance(node, fx.Node) and calls(node, (operator.getitem,)) and node.args[0] is source):
        return False
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
        return False
    part = index[1]
    wanted = (half, None) if upper else (None, half)
    if part.step not in (None, 1):
        return False
    start = None if part.start in (None, 0) else part.start
    return (start, part.stop) == wanted


def _rotate_half_source(node) -> fx.Node | None:
    """x when node is cat((-x[..., D/2:], x[..., :D/2]), dim=-1), else None."""
    if not (isinstance(node, fx.Node) and calls(node, _CAT)):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and dim in (-1, 3)):
        return None
    negated, lower = parts
    if not (isinstance(negated, fx.Node) and (calls(negated, _NEG) or calls(negated, "neg"))):
        return None
    upper = negated.args[0]
    if not isinstance(upper, fx.Node) or not calls(upper, (operator.getitem,)):
        return None
    source = upper.args[0]
    value = example_value(source) if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or not isinstance(value.shape[-1], int):
        return None
    half = value.shape[-1] // 2
    if value.shape[-1] % 2 or not _half_slice(upper, source, half, True) or not _half_slice(lower, source, half, False):
        return None
    return source


def match_rotation(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when node computes x * cos + rotate_half(x) * sin, else None."""
    if not isinstance(node, fx.Node):
        return None
    terms = _operands(node, _ADD, "add")
    if terms is None:
        return None
    for straight, rotated in (terms, terms[::-1]):
        straight_factors = _operands(straight, _MUL, "mul") if isinstance(straight, fx.Node) else None
        rotated_factors = _operands(rotated, _MUL, "mul") if isinstance(rotated, fx.Node) else None
        if straight_factors is None or rotated_factors is None:
            continue
        for half_rotated, sin in (rotated_factors, rotated_factors[::-1]):
            x = _rotate_half_source(half_rotated)
            if x is None or x not in straight_factors:
                continue
            cos = straight_factors[1] if straight_factors[0] is x else straight_factors[0]
            if isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                return x, cos, sin
    return None


def _table_shape_ok(table: fx.Node, x: torch.Tensor) -> bool:
    value = example_value(table)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    batch, _, steps, head_dim = x.shape
    shape = tuple(str(s) for s in value.shape)
    if len(shape) == 4:
        return shape[1] == "1" and shape[0] in ("1", str(batch)) and shape[2:] == (str(steps), str(head_dim))
    return shape == (str(steps), str(head_dim))


def _as_kernel_table(graph: fx.Graph, table: fx.Node, made: dict[fx.Node, fx.Node],
                     shared: dict[fx.Node, fx.Node]) -> fx.Node:
    """[B or 1, 1, T, D] -> [B or 1, T, D]; [T, D] -> [1, T, D] (one node per table; with
    SPECC_SHARE_ROTARY_TABLES=1, one for all layers' unsqueezes of one model table)."""
    if table not in made:
        base = _head_unsqueezed(table) if share_tables_default() else None
        if base is not None:
            made[table] = _shared_table(graph, base, shared)
            return made[table]
        value = example_value(table)
        with graph.inserting_after(table):
            if value.dim() == 4:
                node = graph.call_function(torch.select, (table, 1, 0))
                node.meta["example_value"] = value.select(1, 0)
            else:
                node = graph.call_function(torch.unsqueeze, (table, 0))
                node.meta["example_value"] = value.unsqueeze(0)
        made[table] = node
    return made[table]


def _fusable(rotated: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    match = match_rotation(rotated)
    if match is None:
        return None
    x, cos, sin = match
    x_value, out_value = example_value(x), example_value(rotated)
    if not isinstance(x_value, torch.Tensor) or not isinstance(out_value, torch.Tensor):
        return None
    # the op's q/k takes x's place: only where the rotation kept x's dtype and shape
    if x_value.dtype != out_value.dtype or tuple(map(str, x_value.shape)) != tuple(map(str, out_value.shape)):
        return None
    if not (_table_shape_ok(cos, x_value) and _table_shape_ok(sin, x_value)):
        return None
    return match


def fuse_rotary_into_attention(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    if not fuse_rotary_default():
        return "off (SPECC_FUSE_ROTARY=0): q and k are rotated by Inductor's kernels"
    graph = gm.graph
    made: dict[fx.Node, fx.Node] = {}  # table -> the node the ops get
    shared: dict[fx.Node, fx.Node] = {}  # SPECC_SHARE_ROTARY_TABLES: model table -> its one buffer
    fused = {"kv_write": 0, "tree_attention": 0}
    # (op, index of the rotated operand, name)
    sites = ((torch.ops.specc.kv_write.default, 3, "kv_write"), (torch.ops.specc.tree_attention.default, 0, "tree_attention"))
    for node in list(graph.nodes):
        for target, index, name in sites:
            if node.op != "call_function" or node.target is not target or node.kwargs.get("rope_cos") is not None:
                continue
            match = _fusable(node.args[index])
            if match is None:
                continue
            x, cos, sin = match
            args = list(node.args)
            args[index] = x
            node.args = tuple(args)
            node.kwargs = {**node.kwargs, "rope_cos": _as_kernel_table(graph, cos, made, shared),
                           "rope_sin": _as_kernel_table(graph, sin, made, shared)}
            fused[name] += 1
    graph.eliminate_dead_code()
    for node in graph.nodes:  # the invariant: each op rotates at most once, with both tables
        for target, index, name in sites:
            if node.op != "call_function" or node.target is not target or "rope_cos" not in node.kwargs:
                continue
            if node.kwargs.get("rope_sin") is None or match_rotation(node.args[index]) is not None:
                raise RecognitionError(node, f"{name} was given rotary tables for an operand that is still rotated, "
                                             f"or without rope_sin; set SPECC_FUSE_ROTARY=0 and report the model")
    graph.lint()
    gm.recompile()
    layers = len(skeleton.layers)
    return (f"rotation moved into {fused['tree_attention']} of {layers} tree_attention and {fused['kv_write']} of "
            f"{layers} kv_write calls ({len(set(made.values()))} cos/sin tables)")
