"""The programs the runtime loops, derived from the one rewritten target program.

  prefill(input_ids, prompt_lens, cache_len, k_cache, v_cache) -> (next_logits [B, V], next_hidden [B, H])
      right-padded prompts, causal tree mask; padding writes K/V past each prompt's end,
      which later writes overwrite, so only cache_len matters.
  plain_step(tokens, cache_len, k_cache, v_cache, seeds) -> (out_tokens [B, 1], n_out [B])
      one token per sequence; updates tokens, cache_len and the caches in place, so the same
      static buffers serve every replay of the step's CUDA graph.

Each is plain traced Python over specc ops, compiled by Inductor as one graph: fixed shapes
(the step), no .item(), no data-dependent control flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specc.lowering.topk import DTYPES as TOPK_DTYPES
from specc.passes.pipeline import TargetProgram, causal_mask


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 for greedy or a positive value")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is negative; use 0 to disable top-k")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; use 1.0 to disable top-p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension (the first index of the largest value, NaN above all).

    On the GPU it is specc::topk with k = 1, which ranks exactly as argmax does: Inductor
    reduces each vocabulary row in one program, specc::topk in chunks over many. Measured on an
    H200 (scripts/step_parts.py, 49,152 bf16 logits): 10.4 against 5.9 µs for one row, 12.3
    against 9.2 µs for 64.
    """
    if logits.is_cuda and logits.dtype in TOPK_DTYPES:
        return torch.ops.specc.topk(logits, 1)[1][..., 0]
    return logits.argmax(-1)


def choose_tokens(logits: torch.Tensor, sampling: Sampling, seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> tokens [B]; sampling draws from a counter-based generator keyed by
    (seed, counter), so a request's output does not depend on its batch position."""
    if sampling.greedy:
        return greedy_tokens(logits)
    from specc.lowering.sampling import uniform

    probs = torch.ops.specc.shape_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    # float64 coins: 23-bit ones would quantise every token's probability to 2**-23 steps
    u = uniform(seeds, counter, torch.zeros_like(counter), dtype=torch.float64)
    return torch.ops.specc.sample_tokens(probs, u)


def make_prefill(program: TargetProgram) -> Callable:
    def prefill(input_ids, prompt_lens, cache_len, k_cache, v_cache):
        batch, steps = input_ids.shape
        positions = cache_len[:, None] + torch.arange(steps, device=input_ids.device)[None, :]
        mask = causal_mask(batch, steps, input_ids.device)
        logits, hidden, *_ = program(input_ids, positions, cache_len, mask, k_cache, v_cache)
        rows = torch.arange(batch, device=input_ids.device)
        last = prompt_lens - 1
        return logits[rows, last], hidden[rows, last]

    return prefill


# Off only in scripts/step_variants.py's "plainmask" and "unfused" variants, which time it.
CONSTANT_PLAIN_TENSORS = True


def make_plain_step(program: TargetProgram, sampling: Sampling) -> Callable:
    # The one-token mask and the step's n_out (always 1) are made once, outside the traced step.
    # Built inside it, Inductor refilled a mask buffer before every layer's attention: a kernel
    # per layer, 30 a step on SmolLM2, 26.3 µs of kernels and 14.0 µs of launch gaps in a
    # 994.8 µs step on an H100 (results/2026-12-06b_h100); n_out was one fill kernel more.
    one_mask = torch.ones(1, 1, 1, dtype=torch.bool, device=program.device)
    one_each = torch.ones(1, dtype=torch.int64, device=program.device)
    constant = CONSTANT_PLAIN_TENSORS

    def plain_step(tokens, cache_len, k_cache, v_cache, seeds):
        batch = tokens.shape[0]
        positions = cache_len[:, None]
        mask = one_mask.expand(batch, 1, 1) if constant else torch.ones(batch, 1, 1, dtype=torch.bool, device=tokens.device)
        logits = program(tokens, positions, cache_len, mask, k_cache, v_cache)[0][:, -1]
        # the counter is the position of the token being drawn: unique per request and step
        chosen = choose_tokens(logits, sampling, seeds, cache_len + 1)
        tokens.copy_(chosen[:, None])
        cache_len.add_(1)
        return chosen[:, None], one_each.expand(batch) if constant else torch.ones_like(cache_len)

    return plain_step
