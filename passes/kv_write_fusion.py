"""KV-write fusion: each layer's kv_write + specc::tree_attention pair becomes one specc::kv_write_attention.

Looks for, after the kv_cache and rotary_fusion passes, each tree_attention and the kv_write
before it that writes the same layer of the same caches at the same cache_len, with the same
rotary tables (both or neither), and with no node between them that touches the caches. In
their place, at the attention's position: kv_write_attention(q, k, v, caches, ...), which
writes and attends in one launch (lowering/kv_write_attention.py). Moving the write down to the
attention changes nothing another node could see, since nothing between them uses the caches.

Invariant: every pair that matches is fused, one op per pair, and an attention whose write does
not match is left as it was (so the pass never changes what a graph computes, only how many
launches it takes). Off unless SPECC_FUSE_KV_WRITE=1 (fuse_kv_write_default says why).
"""

from __future__ import annotations

import torch
from torch import fx

from specc.lowering import kv_write, kv_write_attention, tree_attention  # noqa: F401  (registers the ops)
from specc.lowering.registry import env_choice
from specc.passes.skeleton import LlamaSkeleton

KV_WRITE = torch.ops.specc.kv_write.default
TREE_ATTENTION = torch.ops.specc.tree_attention.default
KV_WRITE_ATTENTION = torch.ops.specc.kv_write_attention.default


def fuse_kv_write_default() -> bool:
    """SPECC_FUSE_KV_WRITE=1 writes each layer's K/V inside its attention launch (where that
    launch has at most tree_attention_triton.MAX_WRITE_KV_ROW_TILES row tiles; the launcher
    writes apart past that). Off by default: it has not shortened the speculative step. Fusing
    every pair, on an H100 (results/2026-12-06d_h100, MT-Bench, batch 1, decode time per step):
    plain 891.0 µs against 901.7 (-1.2%), speculative 1,199.8 against 1,195.8 (+0.3%). Alone, one
    launch took 0.85-0.95 times the two at the draft's 12 and 18 new tokens, 0.90-1.02 at plain's
    one, and 1.02-1.19 at 65, the verify's size (scripts/kv_write_attention_bench.py). The
    row-tile rule that keeps the verify apart came after that run; with it, the fp32 GPU
    equivalence tests (tests/test_generate_gpu.py) passed (results/2026-12-06e_h100, call 1), and
    side by side (results/2026-12-07b_h100, scripts/step_variants.py, prompt 0) the speculative
    step's span was 1,238.5 µs against 1,219.9 (+1.5%), plain's 935.4 against 945.6. The first
    form of the kernel, one key loop for the cache and the new K/V, ran 1.1 to 1.8 times slower
    (results/2026-12-06c_h100)."""
    return env_choice("SPECC_FUSE_KV_WRITE", "0", {"1": "one launch writes K/V and attends",
                                                    "0": "a kv_write launch before each attention"}) == "1"


def _rope(node: fx.Node) -> tuple:
    return node.kwargs.get("rope_cos"), node.kwargs.get("rope_sin")


def _matching_write(attention: fx.Node) -> fx.Node | None:
    """The kv_write that attention reads back, if it can move down to attention."""
    _, k_cache, v_cache, layer, cache_len = attention.args[:5]
    node = attention.prev
    while node.op != "root":
        if node.op == "call_function" and node.target is KV_WRITE:
            write_caches, write_layer, write_len = node.args[:2], node.args[2], node.args[5]
            if (write_caches == (k_cache, v_cache) and write_layer == layer and write_len is cache_len
                    and _rope(node) == _rope(attention)):
                return node
            return None  # a kv_write that does not match: stop there (never look past a write)
        if k_cache in node.all_input_nodes or v_cache in node.all_input_nodes:
            return None  # something else reads or writes the caches in between
        node = node.prev
    return None


def fuse_kv_write_into_attention(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    if not fuse_kv_write_default():
        return "off (SPECC_FUSE_KV_WRITE=0): a kv_write launch before each attention"
    graph = gm.graph
    fused = 0
    for attention in [n for n in graph.nodes if n.op == "call_function" and n.target is TREE_ATTENTION]:
        write = _matching_write(attention)
        if write is None:
            continue
        q, k_cache, v_cache, layer, cache_len, tree_mask, scale = attention.args
        key, value = write.args[3], write.args[4]
        with graph.inserting_before(attention):
            node = graph.call_function(KV_WRITE_ATTENTION, (q, key, value, k_cache, v_cache, layer, cache_len,
                                                            tree_mask, scale), dict(attention.kwargs))
        node.meta.update(attention.meta)
        attention.replace_all_uses_with(node)
        graph.erase_node(attention)
        graph.erase_node(write)
        fused += 1
    graph.lint()
    gm.recompile()
    return f"fused {fused} of {len(skeleton.layers)} kv_write + tree_attention pairs into specc::kv_write_attention"
