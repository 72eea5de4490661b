"""specc::kv_write — store the K and V of new tokens into the static caches.

    k_cache[layer, b, :, cache_len[b] + t, :] = k[b, :, t, :]      for t < T
    v_cache[layer, b, :, cache_len[b] + t, :] = v[b, :, t, :]

One op (one kernel launch) for both caches: at decode sizes the write is a few KB, so a launch
per cache cost its launch overhead twice per layer.

`cache` is the stacked static cache [L, B, Hkv, S, D] that the runtime owns; one tensor for
all layers, so that commit (commit_kv.py) moves an accepted path in one launch. Tree nodes
are written at cache_len + node index; commit later moves the accepted ones into place.
The op mutates `cache` in place: Inductor re-inplaces it, so no copy of the cache is made.
With `rope_cos`/`rope_sin` [B or 1, T, D] (lowering/rotary.py), k is the key projection before
its rotary embedding, and the op stores rotate(k, cos, sin): the rotated keys are never
materialised outside the cache. Positions must lie in [0, S). Outside it the two
implementations part: the kernel drops the write, the reference raises past the end and wraps
a negative position. A step from a defined
state never produces one (specc.generate starts the CUDA-graph warm-up at cache_len = slots).
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled
from specc.lowering.rotary import check_rotary, rotate_reference


def kv_write_reference(cache: torch.Tensor, layer: int, new: torch.Tensor, cache_len: torch.Tensor) -> None:
    """The definition, for one cache: cache[layer, b, :, cache_len[b] + t] = new[b, :, t]."""
    batch, _, steps, _ = new.shape
    positions = cache_len.long()[:, None] + torch.arange(steps, device=new.device)[None, :]  # [B, T]
    rows = torch.arange(batch, device=new.device)[:, None].expand(batch, steps)
    # new[b, :, t] -> cache[layer, b, :, positions[b, t]]; indexing a [B, S, Hkv, D] view by
    # (rows, positions) addresses [B, T, Hkv, D], which is new with heads and steps swapped.
    cache[layer].transpose(1, 2)[rows, positions] = new.transpose(1, 2).to(cache.dtype)


@torch.library.custom_op("specc::kv_write", mutates_args=("k_cache", "v_cache"))
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             cache_len: torch.Tensor, rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None) -> None:
    if k.is_cuda and kernel_enabled():
        from specc.lowering.kv_write_triton import kv_write_triton

        kv_write_triton(k_cache, v_cache, layer, k, v, cache_len, rope_cos, rope_sin)  # checks its arguments
        return
    check_rotary(k, rope_cos, rope_sin, "kv_write")
    if rope_cos is not None:
        k = rotate_reference(k, rope_cos, rope_sin)
    kv_write_reference(k_cache, layer, k, cache_len)
    kv_write_reference(v_cache, layer, v, cache_len)


@kv_write.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
      cache_len: torch.Tensor, rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None) -> None:
    return None
