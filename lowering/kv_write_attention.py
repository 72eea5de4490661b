"""specc::kv_write_attention — kv_write then tree_attention, in one launch.

    kv_write(k_cache, v_cache, layer, k, v, cache_len, rope_cos, rope_sin)
    out = tree_attention(q, k_cache, v_cache, layer, cache_len, tree_mask, scale, rope_cos, rope_sin)

Every layer of a step writes its new tokens' K/V into the cache and then attends over the
cache, so kv_write was a launch of its own before each attention: 1.3 µs for plain decode's one
token and 2.1 µs for a 65-node tree on an H100 (results/2026-12-06c_h100), plus a launch gap,
30 times a step. Here the attention kernel takes the tree's K/V from k and v directly and one of
its programs per (sequence, KV head) stores them (lowering/tree_attention_triton.py, WRITE_KV).
Every row tile loads and rotates all the new K/V, so a launch of many row tiles (SmolLM2's
64-node verify: 13) writes with kv_write first instead (MAX_WRITE_KV_ROW_TILES says what was
measured).
The meaning is exactly the two ops in sequence; the reference runs them. One pair of rotary
tables serves q and k, as the rotary_fusion pass gives both ops the same tables.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, T, D]; k_cache, v_cache [L, B, Hkv, S, D] (mutated);
cache_len int [B]; tree_mask bool [B, T, T]; rope_cos/rope_sin [B or 1, T, D] or None.
"""

from __future__ import annotations

import torch

from specc.lowering.kv_write import kv_write_reference
from specc.lowering.registry import kernel_enabled
from specc.lowering.rotary import check_rotary, rotate_reference
from specc.lowering.tree_attention import tree_attention_reference


def kv_write_attention_reference(q, k, v, k_cache, v_cache, layer: int, cache_len, tree_mask, scale: float,
                                 rope_cos=None, rope_sin=None) -> torch.Tensor:
    """The definition: the two ops' references in sequence (caches written in place)."""
    check_rotary(q, rope_cos, rope_sin, "kv_write_attention")
    if rope_cos is not None:
        q = rotate_reference(q, rope_cos, rope_sin).to(q.dtype)
        k = rotate_reference(k, rope_cos, rope_sin)
    kv_write_reference(k_cache, layer, k, cache_len)
    kv_write_reference(v_cache, layer, v, cache_len)
    return tree_attention_reference(q, k_cache, v_cache, layer, cache_len, tree_mask, scale)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k_cache.dim() != 5:
        raise ValueError(f"specc::kv_write_attention expects q [B, Hq, T, D], k and v [B, Hkv, T, D] of one shape and "
                         f"caches [L, B, Hkv, S, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    batch, _, steps, head_dim = q.shape
    want = (batch, k_cache.shape[2], steps, head_dim)
    if tuple(k.shape) != want:
        raise ValueError(f"specc::kv_write_attention: k and v must be [B, Hkv, T, D] = {list(want)} to fit q "
                         f"{tuple(q.shape)} and the cache {tuple(k_cache.shape)}; got {list(k.shape)}")


@torch.library.custom_op("specc::kv_write_attention", mutates_args=("k_cache", "v_cache"))
def kv_write_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, layer: int, cache_len: torch.Tensor, tree_mask: torch.Tensor,
                       scale: float, rope_cos: torch.Tensor | None = None,
                       rope_sin: torch.Tensor | None = None) -> torch.Tensor:
    _check(q, k, v, k_cache)
    if q.is_cuda and kernel_enabled():
        from specc.lowering.tree_attention_triton import tree_attention_triton

        return tree_attention_triton(q, k_cache, v_cache, layer, cache_len, tree_mask, scale,
                                     rope_cos=rope_cos, rope_sin=rope_sin, new_kv=(k, v))  # checks the rest
    return kv_write_attention_reference(q, k, v, k_cache, v_cache, layer, cache_len, tree_mask, scale,
                                        rope_cos, rope_sin)


@kv_write_attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, cache_len, tree_mask, scale, rope_cos=None, rope_sin=None):
    _check(q, k, v, k_cache)
    return torch.empty_like(q)
