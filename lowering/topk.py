"""specc::topk — the k largest entries of every row of a long last dimension, in one total order.

x is [..., V] (the draft's logits or log-probabilities: [B, R, V], V = 49152 for SmolLM2),
float32, bfloat16 or float16; k is an int with 1 <= k <= min(V, 64). The op returns
  values   [..., k]  x's dtype, the entries themselves (bit for bit, -0.0 and NaN included)
  indices  [..., k]  int64, their positions along the last dimension
in the order of one ranking, so that every implementation returns the same indices:
  value descending, then index ascending (among equal values the lower index comes first);
  NaN ranks above every number (above +inf), as in torch.sort and torch.topk, NaNs among
  themselves by index; -0.0 and +0.0 are equal (by index); -inf is an ordinary value, so a
  row with fewer than k entries above -inf still returns k entries, its lowest-index -inf ones.
Its values are torch.topk(x, k, dim=-1, largest=True, sorted=True)'s values; its indices too
except among equal values, where torch.topk's order (and, at the k-th value, its choice of
which equal entries to return) is unspecified: it depends on the device and the algorithm.

Why an op: on a GPU torch.topk over a 49152-wide row runs a multi-block radix select as 6 to
10 small kernels per call (digit counts, cumulative sums, a scan by key, a gather, a bitonic
sort, memsets), ~30-50 µs per call inside a CUDA graph, and a draft step calls it 5 to 8
times. The kernel (topk_triton.py) does it in two launches. Tie order is part of the meaning
because the draft's candidates, and so its trees, must not depend on which one ran.
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled

MAX_K = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def topk_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A stable sort keeps equal values (-0.0 and +0.0 included) in index order; torch.sort
    # puts NaN first when descending. Sorting the whole row costs O(V log V): this is the
    # definition, and the CPU path; the kernel runs on CUDA.
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


def _check(x: torch.Tensor, k: int) -> None:
    if x.dim() < 1:
        raise ValueError("specc::topk needs x with a last dimension to select along; got a 0-dim tensor")
    if x.dtype not in DTYPES:
        raise ValueError(f"specc::topk takes float32, bfloat16 or float16 x; got {x.dtype} (cast it with .float())")
    n_cols = x.shape[-1]
    if not 1 <= k <= min(n_cols, MAX_K):
        raise ValueError(
            f"specc::topk needs 1 <= k <= min(V, {MAX_K}); got k={k} for V={n_cols} "
            f"(for larger k use torch.topk)"
        )


@torch.library.custom_op("specc::topk", mutates_args=())
def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, k)
    if x.is_cuda and kernel_enabled():
        from specc.lowering.topk_triton import topk_triton

        return topk_triton(x, k)
    return topk_reference(x, k)


@topk.register_fake
def _(x, k):
    _check(x, k)
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)
