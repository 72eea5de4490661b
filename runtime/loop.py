"""The decode loop: prefill, then replay the compiled step until every sequence stops.

The runtime knows nothing of graphs or kernels. It owns the static buffers, calls
`prefill(...)` once (with CUDA graphs: at a bucketed prompt length, replayed from that bucket's
graph) and `step(...)` (a CUDA-graph replay on GPU) repeatedly. Each step emits
up to K tokens per sequence (`out_tokens [B, K]`, `n_out [B]`): 1 for plain decode, the
accepted path plus the bonus token for speculative decode. Those are copied to pinned host
memory without waiting; the host reads a step's tokens only `lag` steps later, so stop
checks never stall the GPU.

Near the token budget the loop stops running ahead: once the steps in flight could give every
running sequence the rest of its budget (a step gives each at most K tokens), it reads them
before it launches another. A step launched past the end is thrown away whole; a speculative
decode of 256 tokens takes about 80 steps, so the two steps a lag of 2 would waste cost it about
2.5%. Reading the last few steps as they finish costs a host round trip each instead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specc.runtime.buffers import DecodeBuffers
from specc.runtime.cuda_graph import PaddedPrefill, StepGraph
from specc.runtime.stop import StopChecker


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per sequence, stop token included when hit
    steps: int  # decode steps summed over sequences (target forwards each sequence used)
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    # tokens each (sequence, step) emitted, bonus included, sequence by sequence: the host's copy
    # of the step's n_out, cut at a stop token or the budget, so sum == new tokens - first tokens
    accept_lengths: list[int] = field(default_factory=list)
    sequence_steps: list[int] = field(default_factory=list)  # steps per sequence: splits accept_lengths
    # steps the loop launched: those the sequences used, plus any whose tokens came too late
    # (a stop token the loop read `lag` steps behind the GPU)
    steps_launched: int = 0

    def accept_lengths_by_sequence(self) -> list[list[int]]:
        """accept_lengths split per sequence (a benchmark drops padded rows with it)."""
        split, start = [], 0
        for count in self.sequence_steps:
            split.append(self.accept_lengths[start : start + count])
            start += count
        return split

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def mean_accept_length(self) -> float:
        """Tokens per target forward, bonus included (prefill's first token not counted)."""
        emitted = sum(len(t) - 1 for t in self.tokens)
        return emitted / self.steps if self.steps else float("nan")


class DecodeLoop:
    def __init__(
        self,
        prefill: Callable,
        step: Callable,
        buffers: DecodeBuffers,
        use_cuda_graph: bool,
        lag: int = 2,
        pad_prefill: bool | None = None,
    ) -> None:
        """`pad_prefill` (default: use_cuda_graph) prefills at bucketed lengths (PaddedPrefill),
        from CUDA graphs when use_cuda_graph; False prefills at each batch's exact length."""
        self.prefill = prefill
        self.buffers = buffers
        self.lag = lag
        self.step = StepGraph(step, buffers.step_args()) if use_cuda_graph else None
        self._eager_step = step
        pad = use_cuda_graph if pad_prefill is None else pad_prefill
        self.padded_prefill = (
            PaddedPrefill(prefill, buffers.prefill_args(), buffers.max_seq_len, graphs=use_cuda_graph) if pad else None
        )

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        seeds: Sequence[int],
        choose_first: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> GenerationOutput:
        buffers = self.buffers
        device = buffers.k_cache.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        input_ids, prompt_lens = buffers.load_prompts(prompts, seeds)
        if self.padded_prefill is not None:
            logits, hidden = self.padded_prefill(input_ids, prompt_lens)
        else:
            logits, hidden = self.prefill(input_ids, prompt_lens, *buffers.prefill_args())
        buffers.after_prefill(prompt_lens, choose_first(logits, hidden))
        first = buffers.tokens[:, 0].cpu().tolist()
        prefill_seconds = time.perf_counter() - start

        stops = StopChecker(len(prompts), max_new_tokens, stop_ids)
        stops.extend_all([[t] for t in first], count_step=False)
        start = time.perf_counter()
        pending: deque = deque()
        steps = 0
        width = None  # the most tokens one step gives a sequence: out_tokens' K, known after a step
        # Every step gives each running sequence at least one token, so max_new_tokens steps
        # always suffice; results are read `lag` steps behind the GPU, or at once near the budget.
        while not stops.all_done and (steps < max_new_tokens or pending):
            near_budget = width is not None and stops.most_remaining <= len(pending) * width
            if steps < max_new_tokens and not near_budget:
                out_tokens, n_out = self.step.replay() if self.step else self._eager_step(*buffers.step_args())
                width = out_tokens.shape[1]
                steps += 1
                pending.append(buffers.read_back(out_tokens, n_out))
            if pending and (len(pending) > self.lag or steps >= max_new_tokens or near_budget):
                stops.extend_all(pending.popleft().result())
        sync()
        decode_seconds = time.perf_counter() - start
        tokens = stops.tokens
        return GenerationOutput(
            tokens=tokens,
            steps=sum(stops.steps_taken),
            new_tokens=sum(len(t) for t in tokens),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            accept_lengths=[length for lengths in stops.accept_lengths for length in lengths],
            sequence_steps=stops.steps_taken,
            steps_launched=steps,
        )
