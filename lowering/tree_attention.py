"""specc::tree_attention — attention of T new tokens (a chain or a draft tree) over the cache.

Two passes, merged by log-sum-exp (arXiv:2508.08192, "two-pass tree attention"):
  prefix: queries against cache[layer, b, :, 0 : cache_len[b]]           (no mask)
  suffix: queries against cache[layer, b, :, cache_len[b] : cache_len[b] + T]
          where query i sees key j iff tree_mask[b, i, j]                    (ancestor mask)
  With O_p, L_p and O_s, L_s each pass's normalised output and log-sum-exp of scores:
      L = log(e^L_p + e^L_s),   O = e^(L_p - L) O_p + e^(L_s - L) O_s
The new tokens' K/V must already be in the cache (kv_write runs first), so the suffix reads
the same storage as the prefix and the op itself is pure.

Shapes: q [B, Hq, T, D]; k_cache, v_cache [L, B, Hkv, S, D]; cache_len int [B];
tree_mask bool [B, T, T] with the diagonal set; out [B, Hq, T, D] in q's dtype.
GQA: query head h reads KV head h // (Hq // Hkv).
Prefill is the chain tree (causal mask), plain decode is T = 1.
With `rope_cos`/`rope_sin` [B or 1, T, D] (lowering/rotary.py), q is the query projection before
its rotary embedding and the op attends with rotate(q, cos, sin); the kernel rotates q as it
loads it.
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled
from specc.lowering.rotary import check_rotary, rotate_reference


def tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    cache_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One dense masked softmax per sequence: the definition the two-pass kernel must equal."""
    batch, n_heads, steps, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    for b in range(batch):
        length = int(cache_len[b])
        keys = k_cache[layer, b, :, : length + steps].float().repeat_interleave(group, dim=0)
        values = v_cache[layer, b, :, : length + steps].float().repeat_interleave(group, dim=0)
        visible = torch.cat(
            [torch.ones(steps, length, dtype=torch.bool, device=q.device), tree_mask[b].bool()], dim=1
        )
        scores = (q[b].float() @ keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = (scores.softmax(-1) @ values).to(q.dtype)
    return out


@torch.library.custom_op("specc::tree_attention", mutates_args=())
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    cache_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
) -> torch.Tensor:
    if q.is_cuda and kernel_enabled():
        from specc.lowering.tree_attention_triton import tree_attention_triton

        return tree_attention_triton(q, k_cache, v_cache, layer, cache_len, tree_mask, scale,
                                     rope_cos=rope_cos, rope_sin=rope_sin)  # checks its arguments
    check_rotary(q, rope_cos, rope_sin, "tree_attention")
    rotated = q if rope_cos is None else rotate_reference(q, rope_cos, rope_sin).to(q.dtype)
    return tree_attention_reference(rotated, k_cache, v_cache, layer, cache_len, tree_mask, scale)


@tree_attention.register_fake
def _(q, k_cache, v_cache, layer, cache_len, tree_mask, scale, rope_cos=None, rope_sin=None):
    return torch.empty_like(q)
