"""Static buffers of one decode configuration (batch size, cache length) and their I/O.

The step's CUDA graph reads and writes these tensors by address, so they are allocated once
and refilled in place for every request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ReadBack:
    """One step's emitted tokens on their way to pinned host memory."""

    def __init__(self, out_tokens: torch.Tensor, n_out: torch.Tensor) -> None:
        pin = out_tokens.is_cuda
        self.tokens = torch.empty(out_tokens.shape, dtype=out_tokens.dtype, pin_memory=pin)
        self.counts = torch.empty(n_out.shape, dtype=n_out.dtype, pin_memory=pin)
        self.tokens.copy_(out_tokens, non_blocking=pin)
        self.counts.copy_(n_out, non_blocking=pin)
        self.event = None
        if pin:
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> list[list[int]]:
        if self.event is not None:
            self.event.synchronize()
        counts = self.counts.tolist()
        return [row[:count] for row, count in zip(self.tokens.tolist(), counts)]


class DecodeBuffers:
    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        vocab_size: int,
        extra: Sequence[torch.Tensor] = (),
    ) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self.batch = k_cache.shape[1]
        self.max_seq_len = k_cache.shape[3]
        self.vocab_size = vocab_size
        device = k_cache.device
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.int64, device=device)
        self.cache_len = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self.extra = list(extra)

    def step_args(self) -> tuple:
        return (self.tokens, self.cache_len, self.k_cache, self.v_cache, self.seeds, *self.extra)

    def prefill_args(self) -> tuple:
        return (self.cache_len, self.k_cache, self.v_cache, *self.extra)

    def load_prompts(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts [B, T] and their lengths; resets the per-request state."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for buffers of batch {self.batch}")
        longest = max(len(p) for p in prompts)
        device = self.k_cache.device
        padded = torch.zeros(self.batch, longest, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.int64)
        self.cache_len.zero_()
        self.seeds.copy_(torch.as_tensor(list(seeds), dtype=torch.int64))
        lengths = torch.as_tensor([len(p) for p in prompts], dtype=torch.int64)
        return padded.to(device), lengths.to(device)

    def after_prefill(self, prompt_lens: torch.Tensor, first_tokens: torch.Tensor) -> None:
        self.cache_len.copy_(prompt_lens)
        self.tokens.copy_(first_tokens.view(self.batch, 1))

    def read_back(self, out_tokens: torch.Tensor, n_out: torch.Tensor) -> ReadBack:
        return ReadBack(out_tokens, n_out)
