"""specc::shape_probs and specc::sample_tokens — the sampling primitives as opaque ops.

The definitions are `shape_logits` and `sample_from` in sampling.py. Inside a compiled step
Inductor would generate its own kernels for their cumulative sums (top-p, inverse CDF), and
torch 2.11's Inductor fails to generate the float64 split scan that a [64, 49152] inverse CDF
needs (InductorError in get_block_shape, seen on an H100). As custom ops they run as eager
CUDA kernels inside the step's graph, still without a host sync, so the step's CUDA graph
captures them.
"""

from __future__ import annotations

import torch

from specc.lowering.sampling import sample_from, shape_logits


@torch.library.custom_op("specc::shape_probs", mutates_args=())
def shape_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float32 probabilities after temperature, top-k and top-p (see sampling.shape_logits)."""
    return shape_logits(logits.float(), temperature, top_k, top_p).contiguous()


@shape_probs.register_fake
def _(logits, temperature, top_k, top_p):
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)


@torch.library.custom_op("specc::sample_tokens", mutates_args=())
def sample_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row (see sampling.sample_from): int64 [...]."""
    return sample_from(probs, u)


@sample_tokens.register_fake
def _(probs, u):
    return torch.empty(probs.shape[:-1], dtype=torch.int64, device=probs.device)
