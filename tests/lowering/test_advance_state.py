"""specc::advance_state: the reference against a plain Python loop, its argument checks, and the
Triton kernel against the reference (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.advance_state import advance_state_reference
from tests.lowering.interpreter import interpreted


def advance_loop(tokens, cache_len, out_tokens, accept_len, pending_tokens, pending_count, pending_feats, features):
    """The definition, one sequence and one entry at a time."""
    for b in range(out_tokens.shape[0]):
        a = int(accept_len[b])
        tokens[b, 0] = int(out_tokens[b, a])
        cache_len[b] = int(cache_len[b]) + a + 1
        for j in range(out_tokens.shape[1]):
            pending_tokens[b, j] = max(int(out_tokens[b, j]), 0)
        pending_count[b] = a + 1
        pending_feats[b] = features[b].to(pending_feats.dtype)


@st.composite
def state_cases(draw, max_batch: int = 4, max_slots: int = 7, max_hidden: int = 40):
    """A step's outputs as the verifiers make them: per sequence an accept length a < P and
    out_tokens whose entries past a are -1; random old state (every entry must be overwritten
    or advanced)."""
    batch, slots = draw(st.integers(1, max_batch)), draw(st.integers(1, max_slots))
    accept = [draw(st.integers(0, slots - 1)) for _ in range(batch)]
    out = [[draw(st.integers(0, 50_000)) if j <= a else -1 for j in range(slots)] for a in accept]
    cache_len = [draw(st.integers(0, 4000)) for _ in range(batch)]
    hidden = draw(st.integers(1, max_hidden))
    return batch, slots, accept, out, cache_len, hidden


def make_state(case, device="cpu", index_dtype=torch.int64, feature_dtype=torch.float32, seed=0):
    batch, slots, accept, out, cache_len, hidden = case
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 99, (batch, 1), generator=gen).to(device, index_dtype),
            torch.tensor(cache_len, dtype=index_dtype, device=device),
            torch.tensor(out, dtype=torch.int64, device=device),
            torch.tensor(accept, dtype=index_dtype, device=device),
            torch.randint(0, 99, (batch, slots), generator=gen).to(device, index_dtype),
            torch.randint(0, 99, (batch,), generator=gen).to(device, index_dtype),
            torch.randn(batch, slots, hidden, generator=gen).to(device, feature_dtype),
            torch.randn(batch, slots, hidden, generator=gen).to(device)]  # fp32 features, cast on the way in


def _clone(args):
    return [a.clone() for a in args]


@settings(max_examples=60, deadline=None)
@given(case=state_cases(), index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_reference_equals_sequence_by_sequence_loop(case, index_dtype):
    args = make_state(case, index_dtype=index_dtype)
    want = _clone(args)
    advance_loop(*want)
    advance_state_reference(*args)
    for got, expected in zip(args, want):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_advances_a_two_sequence_step():
    tokens, cache_len = torch.tensor([[7], [8]]), torch.tensor([10, 20])
    out, accept = torch.tensor([[5, 6, -1], [1, 2, 3]]), torch.tensor([1, 2])
    pending_tokens, pending_count = torch.full((2, 3), 9), torch.tensor([4, 4])
    pending_feats, features = torch.zeros(2, 3, 2, dtype=torch.bfloat16), torch.arange(12.0).reshape(2, 3, 2)
    torch.ops.specc.advance_state(tokens, cache_len, out, accept, pending_tokens, pending_count, pending_feats, features)
    assert tokens.tolist() == [[6], [3]] and cache_len.tolist() == [12, 23]
    assert pending_tokens.tolist() == [[5, 6, 0], [1, 2, 3]] and pending_count.tolist() == [2, 3]
    assert torch.equal(pending_feats, features.to(torch.bfloat16))


def test_op_checks_its_arguments_and_passes_opcheck():
    tokens, cache_len, out, accept = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([3, 4]), torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 2])
    pending = (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, dtype=torch.int64), torch.zeros(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"tokens must be \[2, 1\]"):
        torch.ops.specc.advance_state(tokens[:, 0], cache_len, out, accept, *pending)
    with pytest.raises(ValueError, match=r"pending_tokens must be \[2, 3\]"):
        torch.ops.specc.advance_state(tokens, cache_len, out, accept, pending[0][:, :2], *pending[1:])
    with pytest.raises(ValueError, match=r"features must be \[2, 3, H\]"):
        torch.ops.specc.advance_state(tokens, cache_len, out, accept, *pending[:3], pending[3][:, :2])
    with pytest.raises(ValueError, match="cache_len must be int32 or int64"):
        torch.ops.specc.advance_state(tokens, cache_len.float(), out, accept, *pending)
    torch.library.opcheck(torch.ops.specc.advance_state.default, (tokens, cache_len, out, accept, *pending))


def check_kernel_against_reference(case, device: str, index_dtype, feature_dtype) -> None:
    from specc.lowering.advance_state_triton import advance_state_triton

    args = make_state(case, device, index_dtype, feature_dtype)
    want = _clone(args)
    advance_state_reference(*want)
    advance_state_triton(*args)
    for got, expected in zip(args, want):
        assert torch.equal(got, expected), case


@settings(max_examples=25, deadline=None)
@given(case=state_cases(), index_dtype=st.sampled_from([torch.int32, torch.int64]),
       feature_dtype=st.sampled_from([torch.float32, torch.float16]))
def _kernel_property_in_interpreter(case, index_dtype, feature_dtype):
    check_kernel_against_reference(case, "cpu", index_dtype, feature_dtype)


@interpreted
def test_kernel_equals_reference_in_interpreter():
    _kernel_property_in_interpreter()
    # SmolLM2's depth-4 tree: 5 slots of 576 features, more than one BLOCK_F iteration's worth
    # at 5 x 1000
    check_kernel_against_reference((2, 5, [4, 0], [[1, 2, 3, 4, 5], [6, -1, -1, -1, -1]], [100, 7], 576), "cpu",
                                   torch.int64, torch.float16)
    check_kernel_against_reference((1, 5, [2], [[1, 2, 3, -1, -1]], [9], 1000), "cpu", torch.int64, torch.float32)
    from specc.lowering.advance_state_triton import generated_sources

    assert any("SLOTS = tl.constexpr(5)" in s and "FEATURES = tl.constexpr(5000)" in s for s in generated_sources().values())


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(case=state_cases(max_batch=32, max_hidden=600), index_dtype=st.sampled_from([torch.int32, torch.int64]),
       feature_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_kernel_equals_reference_on_gpu(case, index_dtype, feature_dtype):
    check_kernel_against_reference(case, "cuda", index_dtype, feature_dtype)
