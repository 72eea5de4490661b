"""Cached tree attention: each SDPA becomes kv_write (K and V) + specc::tree_attention over a static cache.

Looks for the attention call of every layer (found by the skeleton). In its place: the
layer's rotated keys and un-repeated values are written into the stacked caches
`k_cache`/`v_cache` [L, B, Hkv, S, D] at cache_len[b] + i, then `specc::tree_attention`
attends the queries over the cached prefix and the new tokens under `tree_mask` [B, T, T].
With a causal tree_mask and cache_len = 0 this is the model's own causal attention (prefill);
with T = 1 it is one decode step; with a draft tree's ancestor mask it verifies the tree.
Invariant: no SDPA remains, and the HF mask construction is dead and removed.
"""

from __future__ import annotations

import torch
from torch import fx

from specc.lowering import kv_write, tree_attention  # noqa: F401  (registers the ops)
from specc.passes.graph_utils import SDPA, RecognitionError, calls
from specc.passes.positions import add_placeholder
from specc.passes.skeleton import LlamaSkeleton


def use_cached_tree_attention(gm: fx.GraphModule, skeleton: LlamaSkeleton) -> str:
    graph = gm.graph
    cache_len = add_placeholder(gm, "cache_len")
    tree_mask = add_placeholder(gm, "tree_mask")
    k_cache = add_placeholder(gm, "k_cache")
    v_cache = add_placeholder(gm, "v_cache")
    for index, layer in enumerate(skeleton.layers):
        with graph.inserting_before(layer.attention):
            graph.call_function(torch.ops.specc.kv_write.default, (k_cache, v_cache, index, layer.key, layer.value, cache_len))
            attended = graph.call_function(
                torch.ops.specc.tree_attention.default,
                (layer.query, k_cache, v_cache, index, cache_len, tree_mask, layer.scale),
            )
        attended.meta.update(layer.attention.meta)
        layer.attention.replace_all_uses_with(attended)
        graph.erase_node(layer.attention)
        layer.attention = attended
    graph.eliminate_dead_code()
    leftover = [n for n in graph.nodes if calls(n, SDPA)]
    if leftover:
        raise RecognitionError(leftover[0], "an attention call survived the cache rewrite")
    return f"replaced {len(skeleton.layers)} SDPA calls by kv_write + specc::tree_attention over a [L, B, Hkv, S, D] cache"
