"""Speculative sampling is lossless and reproducible.

The distribution of the first generated tokens of speculative sampling (random EAGLE draft, so
that drafts are often rejected) must equal that of plain sampling of the same target, for a
static tree (Gumbel-top-k children, rule "rrs"; the same tree with rule "q_one"; and with a
draft vocabulary of 10 of the 16 tokens, where q is zero on the rest) and a
dynamic EAGLE-2 tree (reranked top-k children, rule "q_one"), at temperature 1 and with top-k / top-p. Checked by two-sample
chi-square tests at ALPHA over a vocabulary of 16 (few cells), with one generate call of a large
batch per configuration (request i has seed i), so every run draws the same samples and the
verdicts are reproducible. The teeth tests break the rule on purpose and must be caught.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import specc
import specc.lowering.verify_sampling as verify_sampling_module
import specc.passes.speculative_step as speculative_step
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from specc.passes.speculative_step import DynamicTree
from tests.lowering.test_sampling import chi_square_threshold
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

VOCAB = 16
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
PROMPT = [3, 1, 4, 1, 5]
SAMPLES = 2048  # requests per distribution (one generate call)
NEW_TOKENS = 3
STATIC_TREE = [-1, 0, 0, 0, 1, 1, 2]  # depth 2: the root's children are 3 draws, then 2 and 1
DYNAMIC_TREE = DynamicTree(top_k=3, depth=2, size=7)
# name -> (tree, verify_rule): each tree with its default rule, and the static tree verified with
# "q_one" (draft probabilities taken as 1: exact too, only less accepting)
# "static_vocab": the static tree with the draft proposing from 10 of the 16 tokens (a draft
# vocabulary, specc/draft/vocab.py): q is zero on the other 6, which the target still samples
TREES = {"static": (STATIC_TREE, None), "dynamic": (DYNAMIC_TREE, None), "static_q_one": (STATIC_TREE, "q_one"),
         "static_vocab": (STATIC_TREE, None)}
DRAFT_VOCAB = [0, 1, 3, 4, 5, 7, 9, 10, 12, 15]
SETTINGS = {"t1": dict(temperature=1.0), "t07_topk8_topp09": dict(temperature=0.7, top_k=8, top_p=0.9)}


@functools.lru_cache(maxsize=None)
def _target():
    return reference_llama(CONFIG, seed=3)


@functools.lru_cache(maxsize=None)
def _draft():
    return seeded_weights(EagleDraft(DraftConfig.for_target(CONFIG, "eagle")), 4).attach_to(_target()).eval()


@functools.lru_cache(maxsize=None)
def _draft_with_vocab():
    return _draft().with_draft_vocab(0).set_draft_vocab(torch.tensor(DRAFT_VOCAB))


@functools.lru_cache(maxsize=None)
def _compiled(tree: str | None):
    """One compiled module per backend, traced once and reused (with its engines) by every test:
    a fresh torch.compile per call would soon hit Dynamo's recompile limit."""
    draft = _draft_with_vocab() if tree is not None and tree.endswith("_vocab") else _draft()
    backend = specc.backend() if tree is None else specc.backend(draft=draft, tree=TREES[tree][0],
                                                                 verify_rule=TREES[tree][1])
    return torch.compile(_target(), backend=backend)


def _generate(tree: str | None, prompts, seeds, max_new_tokens, **sampling):
    return specc.generate(_compiled(tree), prompts, max_new_tokens=max_new_tokens, seed=seeds, compile=False,
                          **sampling)


def _samples(tree: str | None, setting: str, first_seed: int) -> np.ndarray:
    """[SAMPLES, NEW_TOKENS] tokens of SAMPLES copies of PROMPT, seeds first_seed, first_seed + 1, ..."""
    out = _generate(tree, [PROMPT] * SAMPLES, list(range(first_seed, first_seed + SAMPLES)), NEW_TOKENS,
                    **SETTINGS[setting])
    assert all(len(t) == NEW_TOKENS for t in out.tokens)
    if tree is not None:
        # a request takes one step when its first step accepts a draft token, two when the
        # root's children are all rejected: the random draft must do both (it accepts 6% to 65%
        # in these configurations), or the test would not exercise both branches
        accepted = 2.0 - out.steps / SAMPLES
        assert 0.03 < accepted < 0.9, accepted
    return np.array(out.tokens)


@functools.lru_cache(maxsize=None)
def _plain_samples(setting: str) -> np.ndarray:
    # seeds disjoint from the speculative runs' so that the two samples are independent
    return _samples(None, setting, first_seed=10**6)


def two_sample_chi_square(a: np.ndarray, b: np.ndarray, min_count: int = 10) -> tuple[float, float, int]:
    """Pearson's homogeneity test of two count vectors of equal totals: (statistic, threshold, dof).
    Cells with fewer than `min_count` samples in both together are pooled into one."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.sum() == b.sum()
    small = (a + b) < min_count
    a = np.append(a[~small], a[small].sum())
    b = np.append(b[~small], b[small].sum())
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    dof = len(a) - 1
    if dof < 1:
        return 0.0, math.inf, 0
    return float(((a - b) ** 2 / (a + b)).sum()), chi_square_threshold(dof), dof


def _pair_counts(tokens: np.ndarray, i: int, j: int) -> np.ndarray:
    return np.bincount(tokens[:, i] * VOCAB + tokens[:, j], minlength=VOCAB * VOCAB)


def _distribution_tests(spec: np.ndarray, plain: np.ndarray) -> list[tuple[str, float, float, int]]:
    """Joint laws of tokens (1, 2) and (2, 3): the first step's root child and what follows it."""
    return [(f"tokens {i + 1},{j + 1}", *two_sample_chi_square(_pair_counts(spec, i, j), _pair_counts(plain, i, j)))
            for i, j in [(0, 1), (1, 2)]]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("tree", list(TREES))
def test_speculative_sampling_has_the_distribution_of_plain_sampling(tree, setting):
    spec = _samples(tree, setting, first_seed=0)
    plain = _plain_samples(setting)
    for name, statistic, threshold, dof in _distribution_tests(spec, plain):
        assert statistic < threshold, f"{name}: chi-square {statistic:.1f} >= {threshold:.1f} ({dof} dof)"


def _deterministic_children(logprobs, k, seed, counter, row_ids=None):
    """Top-k instead of Gumbel-top-k: children chosen without sampling (as EAGLE-2's reranking)."""
    keys, tokens = logprobs.float().topk(k, dim=-1)
    return tokens, keys


def _rrs_without_residual(residuals, x, u):
    """Recursive rejection sampling that forgets p <- norm(max(0, p - q)) after a rejection."""
    accepted, after = verify_sampling_module._try_child_rrs(residuals, x, u)
    return accepted, after._replace(p_weights=residuals.p_weights, p_mass=residuals.p_mass)


@pytest.mark.parametrize("broken", ["rrs_on_deterministic_children", "rrs_without_residual"])
def test_a_wrong_rule_is_caught(broken, monkeypatch):
    if broken == "rrs_on_deterministic_children":
        monkeypatch.setattr(speculative_step, "gumbel_top_k", _deterministic_children)
    else:
        monkeypatch.setitem(verify_sampling_module._TRY_CHILD, "rrs", _rrs_without_residual)
    spec = _samples("static", "t1", first_seed=0)
    results = _distribution_tests(spec, _plain_samples("t1"))
    assert any(statistic >= threshold for _, statistic, threshold, _ in results), results


@pytest.mark.parametrize("tree", list(TREES))
def test_same_seed_same_tokens_across_runs_and_batch_positions(tree):
    prompts = [[9, 2, 6], PROMPT, [5, 3, 5, 8, 9, 7, 9, 3]]
    seeds = [11, 12, 13]
    sampling = SETTINGS["t07_topk8_topp09"]
    batched = _generate(tree, prompts, seeds, 12, **sampling).tokens
    assert _generate(tree, prompts, seeds, 12, **sampling).tokens == batched
    for row in range(3):
        alone = _generate(tree, [prompts[row]], [seeds[row]], 12, **sampling).tokens
        assert alone == [batched[row]]
    # another seed gives another stream (16 tokens colliding by chance is negligible)
    assert _generate(tree, [PROMPT], [99], 12, **sampling).tokens != [batched[1]]


def test_verify_rule_is_checked_where_it_is_given():
    with pytest.raises(ValueError, match="verify_rule='exact'"):
        specc.backend(draft=_draft(), tree=STATIC_TREE, verify_rule="exact")
    with pytest.raises(ValueError, match="needs a static tree"):
        speculative_step.sampling_rule(DYNAMIC_TREE, "rrs")
    assert speculative_step.sampling_rule(DYNAMIC_TREE) == "q_one"
    assert speculative_step.sampling_rule(speculative_step.TreePlan.from_parents(STATIC_TREE), "q_one") == "q_one"


def test_true_draft_probabilities_accept_more_than_q_one_on_the_same_tree():
    # one child x ~ q accepts with sum_x min(p, q) under "rrs" and sum_x q p under "q_one"; the
    # first is never smaller, so with the same tree and seeds "rrs" needs fewer steps
    seeds = list(range(SAMPLES))
    steps = {name: _generate(name, [PROMPT] * SAMPLES, seeds, NEW_TOKENS, **SETTINGS["t1"]).steps
             for name in ("static", "static_q_one")}
    assert steps["static"] < steps["static_q_one"], steps
