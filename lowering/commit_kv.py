"""specc::commit_kv — move the accepted path's K/V into place in the stacked caches.

The verify forward wrote tree node i's K/V at cache position cache_len[b] + i (kv_write.py).
Of those, the root and the accepted nodes path[b, 0..a] (a = accept_len[b]; verify_greedy.py)
become the next tokens of the sequence, so for every layer l, sequence b and j in 0..a:

    cache[l, b, :, cache_len[b] + j, :] = cache[l, b, :, cache_len[b] + path[b, j], :]

in both k_cache and v_cache [L, B, Hkv, S, D]. path[b, 0] = 0 and path is increasing with
path[b, j] >= j (nodes are in topological order), so reading all a + 1 rows before writing any
is a correct parallel schedule. Entries of path after a are ignored. The op does not touch
cache_len: the caller adds accept_len + 1. Rows after cache_len[b] + a keep stale tree K/V; the
next step's kv_write overwrites them before anything reads them.
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled


def commit_kv_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    batch, steps = path.shape
    device = path.device
    step = torch.arange(steps, device=device)[None, :]  # [1, P]
    moving = step <= accept_len[:, None]  # [B, P]
    # Entries after accept_len copy a row onto itself: a no-op with fixed shapes.
    source = cache_len.long()[:, None] + torch.where(moving, path.long(), step)
    target = cache_len.long()[:, None] + step
    rows = torch.arange(batch, device=device)[:, None]
    for cache in (k_cache, v_cache):
        by_position = cache.transpose(2, 3)  # [L, B, S, Hkv, D], a view
        moved = by_position[:, rows, source]  # [L, B, P, Hkv, D], a copy: all reads first
        by_position[:, rows, target] = moved


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, path: torch.Tensor,
           accept_len: torch.Tensor) -> None:
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"commit_kv needs k_cache and v_cache of one shape [L, B, Hkv, S, D]; got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch = k_cache.shape[1]
    if path.dim() != 2 or path.shape[0] != batch or cache_len.shape != (batch,) or accept_len.shape != (batch,):
        raise ValueError(
            f"commit_kv for a batch of {batch} needs path [{batch}, P], cache_len [{batch}] and "
            f"accept_len [{batch}]; got {tuple(path.shape)}, {tuple(cache_len.shape)}, "
            f"{tuple(accept_len.shape)}"
        )


@torch.library.custom_op("specc::commit_kv", mutates_args=("k_cache", "v_cache"))
def commit_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    _check(k_cache, v_cache, cache_len, path, accept_len)
    if k_cache.is_cuda and kernel_enabled():
        from specc.lowering.commit_kv_triton import commit_kv_triton

        commit_kv_triton(k_cache, v_cache, cache_len, path, accept_len)
        return
    commit_kv_reference(k_cache, v_cache, cache_len, path, accept_len)


@commit_kv.register_fake
def _(k_cache, v_cache, cache_len, path, accept_len):
    _check(k_cache, v_cache, cache_len, path, accept_len)
    return None
