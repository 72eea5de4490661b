"""lowering/sampling.py: Philox random numbers, inverse-CDF sampling, Gumbel-top-k, logit shaping.

Distributional claims are checked by chi-square tests at a fixed false-alarm rate (ALPHA) with
seeded random numbers, so every run draws the same samples and the verdicts are reproducible.
`chi_square` is also used by test_verify_sampling.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specc.lowering.sampling import (
    STREAM_DRAFT,
    STREAM_SAMPLE,
    STREAM_VERIFY,
    gumbel_top_k,
    philox4x32,
    sample_from,
    shape_logits,
    uniform,
)

ALPHA = 1e-3  # false-alarm rate of every chi-square test in the suite
_Z_ALPHA = 3.090232306167813  # the standard normal's 1 - ALPHA quantile
_Z_HALF_ALPHA = 3.290526731491926  # and its 1 - ALPHA / 2 quantile


def chi_square_threshold(dof: int) -> float:
    """The chi-square(dof) 1 - ALPHA quantile: exact for 1 and 2 degrees of freedom, else by
    Wilson-Hilferty, dof (1 - 2/(9 dof) + z sqrt(2/(9 dof)))^3 (at most 2% high for dof >= 3, so slightly conservative)."""
    if dof == 1:
        return _Z_HALF_ALPHA**2
    if dof == 2:
        return -2.0 * math.log(ALPHA)
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + _Z_ALPHA * math.sqrt(a)) ** 3


def chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, float, int]:
    """Pearson's statistic of counts against probabilities: (statistic, threshold, dof).

    Cells expected to hold fewer than 5 samples are pooled into one (the test's approximation
    needs it); a count in a cell of probability exactly 0 is reported as an infinite statistic.
    """
    observed = np.asarray(observed, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    probs = probs / probs.sum()
    if np.any(observed[probs == 0] > 0):
        return math.inf, 0.0, 0
    expected = probs * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] < 5:  # pool the pooled cell into the smallest large one
        obs, exp = obs[:-1], exp[:-1]
        smallest = np.argmin(exp)
        obs[smallest] += observed[small].sum()
        exp[smallest] += expected[small].sum()
    dof = len(exp) - 1
    if dof < 1:
        return 0.0, math.inf, 0
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return statistic, chi_square_threshold(dof), dof


def counts(values: torch.Tensor, n_cells: int) -> np.ndarray:
    return torch.bincount(values.reshape(-1).long(), minlength=n_cells).numpy()


# --------------------------------------------------------------------------------------------
# Philox and uniform
# --------------------------------------------------------------------------------------------

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter[4] key[2] -> result[4].
RANDOM123_PHILOX4X32_10 = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter_words,key,expected", RANDOM123_PHILOX4X32_10)
def test_philox_matches_random123_known_answers(counter_words, key, expected):
    words = [torch.tensor([w], dtype=torch.long) for w in (*counter_words, *key)]
    assert [int(w) for w in philox4x32(*words)] == list(expected)


def test_uniform_is_a_function_of_seed_counter_stream_index_alone():
    seed = torch.tensor([5, -3, 2**40 + 7, 5])
    counter = torch.tensor([0, 11, 2**33, 1])
    index = torch.arange(64)[None, :]
    u = uniform(seed, counter, index, STREAM_VERIFY)
    assert u.dtype == torch.float32 and u.shape == (4, 64)
    # the same numbers at any batch position, in any batch size, on every call
    order = torch.tensor([3, 1, 0, 2])
    assert torch.equal(uniform(seed[order], counter[order], index, STREAM_VERIFY), u[order])
    for b in range(4):
        assert torch.equal(uniform(seed[b : b + 1], counter[b : b + 1], index, STREAM_VERIFY), u[b : b + 1])
    # a per-row index gives the same numbers as a broadcast one
    assert torch.equal(uniform(seed, counter, index.expand(4, 64), STREAM_VERIFY), u)
    # rows 0 and 3 differ only in the counter; streams differ too
    assert not torch.equal(u[0], u[3])
    assert not torch.equal(uniform(seed, counter, index, STREAM_DRAFT), u)
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0


def test_uniform_extremes_stay_inside_the_open_interval():
    # the extreme words map to 2**-24 and 1 - 2**-24 (float32), 2**-53 and 1 - 2**-53 (float64),
    # all exact; the formulas are uniform's
    words = torch.tensor([0, 0xFFFFFFFF])
    u = ((words >> 9).float() + 0.5) * (1.0 / 2**23)
    assert u.tolist() == [2.0**-24, 1.0 - 2.0**-24]
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    u64 = (((words >> 12) << 32) + words).double().add(0.5).mul(2.0**-52)
    assert u64.tolist() == [2.0**-53, 1.0 - 2.0**-53]


def test_uniform_float64_extends_the_float32_numbers():
    seed, counter, index = torch.tensor([3, 4]), torch.tensor([5, 6]), torch.arange(1000)[None, :]
    u32 = uniform(seed, counter, index, STREAM_VERIFY)
    u64 = uniform(seed, counter, index, STREAM_VERIFY, torch.float64)
    assert u64.dtype == torch.float64 and 0 < float(u64.min()) and float(u64.max()) < 1
    # both start from the top 20 bits of the first Philox word
    assert ((u64 - u32.double()).abs() < 2.0**-20).all()
    assert not torch.equal(u64.float(), u32)
    with pytest.raises(ValueError, match="dtype"):
        uniform(seed, counter, index, STREAM_VERIFY, torch.float16)


def _grid_counts(a: torch.Tensor, b: torch.Tensor, bins: int) -> np.ndarray:
    cells = (a * bins).long().clamp(max=bins - 1) * bins + (b * bins).long().clamp(max=bins - 1)
    return counts(cells, bins * bins)


def test_uniform_is_uniform_and_independent_across_index_counter_seed_and_stream():
    n = 100_000
    seed = torch.tensor([1234, 1235])
    counter = torch.tensor([7, 7])
    index = torch.arange(n)[None, :]
    u = uniform(seed, counter, index, STREAM_SAMPLE)  # [2, n]: seeds differing by one
    next_counter = uniform(seed, counter + 1, index, STREAM_SAMPLE)
    other_stream = uniform(seed, counter, index, STREAM_DRAFT)
    bins = 64
    statistic, threshold, _ = chi_square(counts((u[0] * bins).long(), bins), np.ones(bins))
    assert statistic < threshold
    pairs = {
        "neighbouring indices": (u[0, :-1:2], u[0, 1::2]),
        "neighbouring seeds": (u[0], u[1]),
        "neighbouring counters": (u[0], next_counter[0]),
        "two streams": (u[0], other_stream[0]),
    }
    for name, (a, b) in pairs.items():
        statistic, threshold, _ = chi_square(_grid_counts(a, b, 16), np.ones(256))
        assert statistic < threshold, f"{name}: chi-square {statistic:.1f} >= {threshold:.1f}"


# --------------------------------------------------------------------------------------------
# sample_from
# --------------------------------------------------------------------------------------------


@st.composite
def distributions(draw, max_vocab: int = 12):
    """Random probability vectors with some exact zeros (at least one positive entry)."""
    vocab = draw(st.integers(2, max_vocab))
    weights = draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 7.0]), min_size=vocab, max_size=vocab))
    if sum(weights) == 0:
        weights[draw(st.integers(0, vocab - 1))] = 1.0
    return np.array(weights)


@settings(max_examples=15, deadline=None)
@given(weights=distributions(), seed=st.integers(-(2**40), 2**40), scale=st.sampled_from([1.0, 3.5, 1e-3]))
def test_sample_from_draws_the_given_distribution(weights, seed, scale):
    n = 20_000
    probs = torch.tensor(weights / weights.sum(), dtype=torch.float32)
    u = uniform(torch.tensor([seed]), torch.tensor([0]), torch.arange(n)[None, :])[0]
    # unnormalised rows are sampled as their normalisation
    tokens = sample_from((probs * scale).expand(n, -1), u)
    statistic, threshold, dof = chi_square(counts(tokens, len(weights)), weights)
    assert statistic < threshold, f"chi-square {statistic:.1f} >= {threshold:.1f} ({dof} dof)"


def test_sample_from_never_returns_a_token_of_zero_probability():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 4)
    # the first token whose cumulative probability exceeds u: cdf = 0, .25, .25, 1, 1, 1
    u = torch.tensor([2.0**-24, 0.2499999, 0.25, 1.0 - 2.0**-24])
    assert sample_from(probs, u).tolist() == [1, 1, 3, 3]
    # rounding pushes u * sum to or past the last cumulative value: the last positive token
    assert sample_from(probs, torch.tensor([1.0, 1.0, 1.0, 1.0])).tolist() == [3, 3, 3, 3]


def test_sample_from_resolves_probabilities_below_float32_steps():
    # a token of probability 1e-9 after one of ~1: float32 cumulative sums cannot tell them apart
    probs = torch.tensor([[1.0, 1e-9, 0.0]] * 2)
    u = torch.tensor([1.0 - 2e-9, 1.0 - 5e-10], dtype=torch.float64)
    assert sample_from(probs, u).tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# gumbel_top_k
# --------------------------------------------------------------------------------------------


def test_gumbel_top_k_draws_without_replacement_in_draw_order():
    n = 40_000
    probs = torch.tensor([0.35, 0.25, 0.0, 0.2, 0.1, 0.1])
    vocab = len(probs)
    logprobs = probs.log().expand(n, 1, vocab)
    seed = torch.arange(n) * 1_000_003 + 17
    tokens, keys = gumbel_top_k(logprobs, 3, seed, torch.zeros(n, dtype=torch.long), torch.tensor([[4]]))
    tokens, keys = tokens[:, 0], keys[:, 0]
    assert (tokens[:, 0] != tokens[:, 1]).all() and (tokens[:, 1] != tokens[:, 2]).all()
    assert (tokens[:, 0] != tokens[:, 2]).all()
    assert (keys[:, :-1] >= keys[:, 1:]).all()
    assert (tokens != 2).all(), "a token of probability 0 was drawn while others remained"
    # first draw ~ q;  ordered pair (a, b) ~ q(a) q(b) / (1 - q(a))
    statistic, threshold, _ = chi_square(counts(tokens[:, 0], vocab), probs.numpy())
    assert statistic < threshold
    q = probs.double().numpy()
    pair_probs = q[:, None] * q[None, :] / (1 - q[:, None])
    np.fill_diagonal(pair_probs, 0.0)
    statistic, threshold, _ = chi_square(counts(tokens[:, 0] * vocab + tokens[:, 1], vocab * vocab), pair_probs)
    assert statistic < threshold


def test_gumbel_top_k_past_the_support_marks_draws_with_minus_infinity():
    logprobs = torch.tensor([[[0.0, float("-inf"), 0.0, float("-inf")]]]).expand(8, 1, 4)
    tokens, keys = gumbel_top_k(logprobs, 4, torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert set(tokens[:, 0, :2].reshape(-1).tolist()) == {0, 2}
    assert torch.isinf(keys[:, 0, 2:]).all() and torch.isfinite(keys[:, 0, :2]).all()


def test_gumbel_top_k_rows_get_independent_noise():
    logprobs = torch.zeros(1, 3, 16)
    seed, counter = torch.tensor([9]), torch.tensor([0])
    tokens, _ = gumbel_top_k(logprobs, 16, seed, counter)
    assert len({tuple(row) for row in tokens[0].tolist()}) == 3
    # row_ids name the rows: the same id draws the same permutation
    same, _ = gumbel_top_k(logprobs, 16, seed, counter, torch.tensor([[5, 5, 6]]))
    assert torch.equal(same[0, 0], same[0, 1]) and not torch.equal(same[0, 0], same[0, 2])
    with pytest.raises(ValueError, match="k=17"):
        gumbel_top_k(logprobs, 17, seed, counter)


# --------------------------------------------------------------------------------------------
# shape_logits
# --------------------------------------------------------------------------------------------


def _shape_row(logits: list[float], temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """shape_logits' documented definition for one row, in float64 Python."""
    vocab = len(logits)
    if temperature <= 0:
        out = np.zeros(vocab)
        out[int(np.argmax(logits))] = 1.0
        return out
    scores = np.array(logits, dtype=np.float64) / temperature
    if 0 < top_k < vocab:
        kth = sorted(scores, reverse=True)[top_k - 1]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1:
        order = sorted(range(vocab), key=lambda v: (-probs[v], v))
        keep = np.zeros(vocab, dtype=bool)
        mass = 0.0
        for v in order:
            if mass < top_p:
                keep[v] = True
            mass += probs[v]
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


@st.composite
def shaping(draw):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 9))
    # small integers make ties (top-k keeps all of a tie; top-p orders a tie by token id)
    logits = draw(
        st.lists(st.lists(st.integers(-4, 4).map(float), min_size=vocab, max_size=vocab), min_size=rows, max_size=rows)
    )
    temperatures = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.7]), min_size=rows, max_size=rows))
    top_ks = draw(st.lists(st.integers(0, vocab + 1), min_size=rows, max_size=rows))
    top_ps = draw(st.lists(st.sampled_from([0.3, 0.5, 0.9, 1.0]), min_size=rows, max_size=rows))
    return logits, temperatures, top_ks, top_ps


@settings(max_examples=40, deadline=None)
@given(case=shaping(), middle=st.integers(1, 3))
def test_shape_logits_matches_its_definition(case, middle):
    logits, temperatures, top_ks, top_ps = case
    rows = len(logits)
    x = torch.tensor(logits)[:, None, :].expand(rows, middle, -1)
    # one setting per request, as tensors [B]
    probs = shape_logits(x, torch.tensor(temperatures), torch.tensor(top_ks), torch.tensor(top_ps))
    for b in range(rows):
        expected = _shape_row(logits[b], temperatures[b], top_ks[b], top_ps[b])
        for m in range(middle):
            np.testing.assert_allclose(probs[b, m].numpy(), expected, atol=1e-5, rtol=1e-4)
        # one setting for all rows, as Python numbers
        alone = shape_logits(x[b : b + 1], temperatures[b], top_ks[b], top_ps[b])
        np.testing.assert_allclose(alone[0, 0].numpy(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows, middle))


def test_sampling_primitives_trace_into_one_graph():
    def step(logits, seed, counter, temperature, top_k, top_p):
        probs = shape_logits(logits, temperature, top_k, top_p)
        tokens, _ = gumbel_top_k(probs.log(), 2, seed, counter)
        u = uniform(seed, counter, torch.zeros(1, 1, dtype=torch.long), STREAM_SAMPLE)
        return tokens, sample_from(probs[:, 0], u[:, 0])

    args = (
        torch.randn(3, 2, 10), torch.tensor([1, 2, 3]), torch.tensor([0, 0, 4]),
        torch.tensor([0.7, 1.0, 0.0]), torch.tensor([3, 0, 5]), torch.tensor([0.9, 1.0, 0.5]),
    )
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    for got, want in zip(compiled(*args), step(*args)):
        assert torch.equal(got, want)
