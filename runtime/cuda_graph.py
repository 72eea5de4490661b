"""Whole-step CUDA graphs: capture the compiled step once over static buffers, then replay.

A replay launches every kernel of the step (attention included) with one host call, which is
what makes a small model's decode step fast (arXiv:2508.08192, "whole-step CUDA graphs").

The prefill is graphed too, one graph per prompt-length bucket (`PaddedPrefill`): run from
Inductor's dynamic-shape wrapper it costs the host tens of µs per kernel, about 20 ms for the
embedded model's 30 layers, which is longer than it takes the GPU to run (measured on an H200:
`results/2026-12-02_h200_fused/spec.json.xz`, prefill 22 ms per prompt against 1.1 ms per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The shortest padded prompt: prompts this short cost the same to prefill at any length.
MIN_PREFILL_BUCKET = 16


class StepGraph:
    def __init__(self, step: Callable, args: tuple, warmup: int = 3, pool=None) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles, autotunes and allocates outside the capture
                step(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = step(*args)
        torch.cuda.synchronize()

    def replay(self):
        self.graph.replay()
        return self.outputs


def prefill_bucket(length: int, capacity: int) -> int:
    """The padded length a prompt of `length` tokens is prefilled at: the next power of two, at
    least MIN_PREFILL_BUCKET, at most the cache's `capacity` (the padding's K/V is written there).
    Powers of two keep the graphs few (one per doubling) and the padding under 2x."""
    if length < 1 or length > capacity:
        raise ValueError(f"a prompt of {length} tokens does not fit a cache of {capacity} positions")
    bucket = max(MIN_PREFILL_BUCKET, 1 << (length - 1).bit_length())
    return min(bucket, capacity)


class PaddedPrefill:
    """The prefill at bucketed prompt lengths, replayed from one CUDA graph per bucket.

    Prompts come right-padded to their longest; this pads them further, to
    `prefill_bucket(longest, capacity)`, so that the few bucket shapes can be captured. The
    padding is harmless for the same reason right padding in a batch is: position p attends
    only to positions <= p, the prefill returns each row's state at its own last prompt token,
    and the padding's K/V lies at or past cache_len, where every later step writes before it
    reads. `args` are the static buffers the prefill takes after (input_ids, prompt_lens).
    With `graphs=False` (no GPU; tests) the padded prefill runs directly.
    """

    def __init__(self, prefill: Callable, args: tuple, capacity: int, graphs: bool, warmup: int = 2) -> None:
        self.prefill, self.args, self.capacity = prefill, args, capacity
        self.use_graphs, self.warmup = graphs, warmup
        # one memory pool for every bucket's graph: only one prefill runs at a time, and each
        # graph's outputs stay allocated, so the graphs share intermediates, not results
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, StepGraph]] = {}

    def __call__(self, input_ids: torch.Tensor, prompt_lens: torch.Tensor):
        batch, longest = input_ids.shape
        bucket = prefill_bucket(longest, self.capacity)
        if not self.use_graphs:
            padded = input_ids.new_zeros(batch, bucket)
            padded[:, :longest] = input_ids
            return self.prefill(padded, prompt_lens, *self.args)
        if bucket not in self.graphs:
            static_ids = input_ids.new_zeros(batch, bucket)
            static_lens = prompt_lens.clone()
            static_ids[:, :longest] = input_ids
            static_lens.copy_(prompt_lens)
            # the warm-up runs really prefill these prompts: the prefill only writes what a
            # later prefill of any prompt overwrites (K/V from position 0, the draft's pending
            # state), so running it early is harmless
            graph = StepGraph(self.prefill, (static_ids, static_lens, *self.args), warmup=self.warmup, pool=self.pool)
            self.graphs[bucket] = (static_ids, static_lens, graph)
        static_ids, static_lens, graph = self.graphs[bucket]
        static_ids.zero_()
        static_ids[:, :longest].copy_(input_ids)
        static_lens.copy_(prompt_lens)
        return graph.replay()
