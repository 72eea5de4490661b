"""GenerationOutput.accept_lengths: one entry per (sequence, step) the sequence used, the tokens
that step gave it (bonus included), consistent with `steps`, the emitted tokens and
mean_accept_length."""

from __future__ import annotations

import math

import pytest
import torch

import specc
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from specc.runtime.stop import StopChecker
from tests.models_factory import reference_llama
from tests.oracle_draft import OracleDraft
from tests.strategies import seeded_weights

SMALL = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)
PROMPTS = [[7, 7, 1], [2, 4, 8, 16, 32], [5]]


def _assert_consistent(out) -> None:
    emitted = sum(len(t) - 1 for t in out.tokens)  # the prefill's first token is no step's
    assert sum(out.accept_lengths) == emitted
    assert len(out.accept_lengths) == out.steps
    assert out.mean_accept_length == pytest.approx(sum(out.accept_lengths) / len(out.accept_lengths))
    assert all(length >= 1 for length in out.accept_lengths)
    per_sequence = out.accept_lengths_by_sequence()
    assert [len(lengths) for lengths in per_sequence] == out.sequence_steps
    assert [sum(lengths) for lengths in per_sequence] == [len(t) - 1 for t in out.tokens]


def test_stop_checker_records_what_each_step_gave_each_running_sequence():
    stops = StopChecker(batch=2, max_new_tokens=5, stop_ids=[9])
    stops.extend_all([[1], [1]], count_step=False)
    stops.extend_all([[2, 3], [9, 4]])  # row 1 stops at its stop token: 1 token kept
    stops.extend_all([[4, 5, 6], [7]])  # row 0 reaches the budget after 2; row 1 is done
    assert stops.accept_lengths == [[2, 2], [1]]
    assert stops.steps_taken == [2, 1]
    assert stops.tokens == [[1, 2, 3, 4, 5], [1, 9]]


def test_plain_decode_accepts_one_token_per_step():
    target = reference_llama(SMALL, seed=2)
    out = specc.generate(torch.compile(target, backend=specc.backend()), PROMPTS, max_new_tokens=9, compile=False)
    _assert_consistent(out)
    assert out.accept_lengths == [1] * (8 * len(PROMPTS))


def test_oracle_draft_accepts_the_whole_chain_every_step_until_the_budget():
    target = reference_llama(SMALL, seed=2)
    new, depth = 25, 4
    plain = specc.generate(torch.compile(target, backend=specc.backend()), PROMPTS, max_new_tokens=new + 12,
                           compile=False)
    oracle = OracleDraft([p + t for p, t in zip(PROMPTS, plain.tokens)], SMALL.vocab_size, SMALL.hidden_size)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=oracle, tree=f"chain:{depth}")),
                          PROMPTS, max_new_tokens=new, compile=False)
    _assert_consistent(spec)
    steps = math.ceil((new - 1) / (depth + 1))
    last = (new - 1) - (steps - 1) * (depth + 1)  # the budget cuts the last step short
    assert spec.accept_lengths_by_sequence() == [[depth + 1] * (steps - 1) + [last]] * len(PROMPTS)


@pytest.mark.parametrize("tree", ["eagle", "dynamic:4,4,16"])
def test_random_draft_accept_lengths_sum_to_the_emitted_tokens(tree):
    target = reference_llama(SMALL, seed=3)
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(SMALL)), 4).attach_to(target).eval()
    compiled = torch.compile(target, backend=specc.backend(draft=draft, tree=tree))
    out = specc.generate(compiled, PROMPTS, max_new_tokens=14, compile=False)
    _assert_consistent(out)
    free = out.tokens[0]
    # a stop token mid-path: the step that met it counts only the tokens up to the stop
    stopped = specc.generate(compiled, PROMPTS, max_new_tokens=14, stop_ids=[free[5]], compile=False)
    _assert_consistent(stopped)
