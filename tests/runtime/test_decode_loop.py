"""The decode loop's scheduling (runtime.loop.DecodeLoop), with scripted steps in place of a model.

A scripted step emits a fixed number of tokens per call and counts its launches, so these tests
see what the loop launches and when it reads: it runs `lag` steps ahead of its reads, it never
launches a step whose tokens the budget would throw away, and it returns exactly the tokens the
steps gave, cut at a stop token or the budget.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from specc.runtime.buffers import DecodeBuffers
from specc.runtime.loop import DecodeLoop

FIRST = 1000  # the prefill's token; step tokens count up from 1


class ScriptedStep:
    """Emits, per sequence, `accepts[row][call]` tokens a call, of `width` slots: sequence r's
    tokens count up from 100 r + 1."""

    def __init__(self, accepts: list[list[int]], width: int) -> None:
        self.accepts = accepts
        self.width = width
        self.calls = 0
        self.next_token = [100 * row + 1 for row in range(len(accepts))]
        self.events: list[tuple[str, int]] = []

    def __call__(self, tokens, cache_len, k_cache, v_cache, seeds):
        batch = len(self.accepts)
        out = torch.full((batch, self.width), -1, dtype=torch.int64)
        n_out = torch.zeros(batch, dtype=torch.int64)
        for row, script in enumerate(self.accepts):
            count = script[self.calls % len(script)]
            out[row, :count] = torch.arange(self.next_token[row], self.next_token[row] + count)
            n_out[row] = count
            self.next_token[row] += count
        self.calls += 1
        self.events.append(("launch", self.calls))
        return out, n_out


def _loop(step: ScriptedStep, batch: int, lag: int = 2) -> tuple[DecodeLoop, DecodeBuffers]:
    cache = torch.zeros(1, batch, 1, 64, 4)
    buffers = DecodeBuffers(cache, cache.clone(), vocab_size=4096)

    def prefill(input_ids, prompt_lens, *args):
        return torch.zeros(batch, 4096), None

    loop = DecodeLoop(prefill, step, buffers, use_cuda_graph=False, lag=lag, pad_prefill=False)
    honest = buffers.read_back

    def read_back(out_tokens, n_out):  # logs when the loop reads each step's tokens
        pending, call = honest(out_tokens, n_out), step.calls
        result = pending.result

        def logged():
            step.events.append(("read", call))
            return result()

        pending.result = logged
        return pending

    buffers.read_back = read_back
    return loop, buffers


def _run(step: ScriptedStep, max_new_tokens: int, stop_ids=(), lag: int = 2):
    batch = len(step.accepts)
    loop, _ = _loop(step, batch, lag)
    first = lambda logits, hidden: torch.full((batch,), FIRST, dtype=torch.int64)  # noqa: E731
    return loop.run([[5, 6]] * batch, max_new_tokens, stop_ids, [0] * batch, first)


def _expected(script: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """The tokens plain bookkeeping gives (first token, then the steps' tokens, cut at the budget)
    and the steps needed to reach the budget."""
    tokens, steps = [FIRST], 0
    for count in itertools.cycle(script):
        if len(tokens) >= max_new_tokens:
            return tokens[:max_new_tokens], steps
        tokens += list(range(len(tokens), len(tokens) + count))
        steps += 1


@pytest.mark.parametrize("width, script", [(1, [1]), (5, [3, 1, 5, 2, 4]), (5, [5]), (5, [1]), (7, [2, 7, 1])])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 40])
def test_the_loop_launches_no_step_past_the_budget_and_returns_the_steps_tokens(width, script, max_new_tokens):
    step = ScriptedStep([script], width)
    out = _run(step, max_new_tokens)
    tokens, steps = _expected(script, max_new_tokens)
    assert out.tokens == [tokens]
    assert step.calls == steps  # no step whose tokens the budget would throw away
    assert out.steps == steps
    assert sum(out.accept_lengths) == len(tokens) - 1


def test_the_loop_runs_lag_steps_ahead_of_its_reads_until_the_budget_is_near():
    step = ScriptedStep([[2]], width=4)
    _run(step, max_new_tokens=61, lag=2)  # 30 steps of 2 tokens after the first
    launches = [call for kind, call in step.events if kind == "launch"]
    assert launches == list(range(1, 31))
    # far from the budget, step n is read only after step n + 2 was launched
    position = {event: i for i, event in enumerate(step.events)}
    far = [n for n in range(1, 31) if 60 - 2 * n > 3 * 4]
    assert far and all(position[("read", n)] > position[("launch", n + 2)] for n in far)
    # near it, no step is launched while the steps in flight could finish the budget
    in_flight, given = 0, 1
    for kind, call in step.events:
        if kind == "launch":
            assert 61 - given > in_flight * 4, f"step {call} launched with {in_flight} in flight and {61 - given} to go"
            in_flight += 1
        else:
            in_flight, given = in_flight - 1, given + 2


def test_a_batch_runs_until_its_longest_budget_and_a_stop_token_ends_one_sequence():
    # sequence 0 stops at its token 9; sequence 1 runs to the budget
    step = ScriptedStep([[3], [2]], width=3)
    out = _run(step, max_new_tokens=20, stop_ids=[9])
    assert out.tokens[0] == [FIRST, *range(1, 10)]
    assert out.tokens[1] == [FIRST, *range(101, 120)]
    assert step.calls == 10  # sequence 1's budget: 19 tokens at 2 a step
    assert out.sequence_steps == [3, 10]


def test_a_stop_token_the_loop_cannot_foresee_costs_at_most_lag_steps():
    step = ScriptedStep([[2]], width=2)
    out = _run(step, max_new_tokens=100, stop_ids=[9], lag=2)
    assert out.tokens == [[FIRST, *range(1, 10)]]
    assert out.steps == 5
    assert 5 <= step.calls <= 5 + 2
