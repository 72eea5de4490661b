"""The generated kv_write kernel (lowering/kv_write_triton.py: K and V in one launch) equals the
reference applied to each cache, run through
Triton's interpreter on the CPU (in a fresh interpreting process when this one compiles; see
tests/lowering/interpreter.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be interpreted")

from specc.lowering.kv_write import kv_write_reference  # noqa: E402
from specc.lowering.kv_write_triton import generated_sources, kernel_source, kv_write_triton, launch_settings  # noqa: E402
from tests.lowering.interpreter import interpreted  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@st.composite
def write_cases(draw):
    batch = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 40))  # past 16 tokens the write spans several programs
    capacity = steps + draw(st.integers(0, 30))
    n_layers = draw(st.integers(1, 3))
    return dict(
        n_layers=n_layers,
        layer=draw(st.integers(0, n_layers - 1)),
        batch=batch,
        n_kv=draw(st.integers(1, 3)),
        steps=steps,
        capacity=capacity,
        head_dim=draw(st.sampled_from([4, 8, 24])),  # 24: a padded D tile
        cache_len=draw(st.lists(st.integers(0, capacity - steps), min_size=batch, max_size=batch)),
        cache_len_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        cache_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        new_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        heads_last=draw(st.booleans()),  # new as a [B, T, Hkv, D] tensor seen as [B, Hkv, T, D]
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@interpreted
@settings(max_examples=40, deadline=None)
@given(case=write_cases())
def test_kv_write_kernel_equals_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    batch, n_kv, steps, head_dim = case["batch"], case["n_kv"], case["steps"], case["head_dim"]

    def new_tokens():
        if case["heads_last"]:
            new = torch.randn(batch, steps, n_kv, head_dim, generator=gen).transpose(1, 2)
        else:
            new = torch.randn(batch, n_kv, steps, head_dim, generator=gen)
        return new.to(case["new_dtype"])

    # Random (never zero) cache contents: a missing write and a stray write both show.
    shape = (case["n_layers"], batch, n_kv, case["capacity"], head_dim)
    k_cache = torch.randn(*shape, generator=gen).to(case["cache_dtype"])
    v_cache = torch.randn(*shape, generator=gen).to(case["cache_dtype"])
    k, v = new_tokens(), new_tokens()
    cache_len = torch.tensor(case["cache_len"], dtype=case["cache_len_dtype"])
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kv_write_reference(k_expected, case["layer"], k, cache_len)
    kv_write_reference(v_expected, case["layer"], v, cache_len)
    kv_write_triton(k_cache, v_cache, case["layer"], k, v, cache_len)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@interpreted
@settings(max_examples=30, deadline=None)
@given(case=write_cases(), shared=st.booleans())
def test_kv_write_kernel_rotating_k_equals_the_reference_on_the_rotated_k(case, shared):
    # With rope_cos/rope_sin, K is rotated on its way into the cache (computed in fp32, rounded
    # once to the cache's dtype); V is copied as it is.
    from specc.lowering.rotary import rotate_reference

    gen = torch.Generator().manual_seed(case["seed"])
    batch, n_kv, steps, head_dim = case["batch"], case["n_kv"], case["steps"], case["head_dim"]
    shape = (case["n_layers"], batch, n_kv, case["capacity"], head_dim)
    k_cache = torch.randn(*shape, generator=gen).to(case["cache_dtype"])
    v_cache = torch.randn(*shape, generator=gen).to(case["cache_dtype"])
    k = torch.randn(batch, steps, n_kv, head_dim, generator=gen).transpose(1, 2).to(case["new_dtype"])
    v = torch.randn(batch, n_kv, steps, head_dim, generator=gen).to(case["new_dtype"])
    angles = torch.rand(1 if shared else batch, steps, head_dim // 2, generator=gen) * 100
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(case["new_dtype"])
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(case["new_dtype"])
    cache_len = torch.tensor(case["cache_len"], dtype=case["cache_len_dtype"])
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kv_write_reference(k_expected, case["layer"], rotate_reference(k.float(), cos.float(), sin.float()), cache_len)
    kv_write_reference(v_expected, case["layer"], v, cache_len)
    kv_write_triton(k_cache, v_cache, case["layer"], k, v, cache_len, cos, sin)
    tolerance = dict(atol=1e-6, rtol=1e-6) if case["cache_dtype"] == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(k_cache, k_expected, **tolerance)
    assert torch.equal(v_cache, v_expected)


@interpreted
def test_both_forms_of_the_rotation_and_every_tile_write_the_same_cache():
    # launch_settings rotates K as two contiguous halves past one token, with a gathered
    # partner tile at one token: the same products and sums, so the same bits, whatever the
    # tile and warps.
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 11, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 2, 11, 16, generator=gen)
    cos, sin = torch.randn(2, 11, 16, generator=gen), torch.randn(2, 11, 16, generator=gen)
    cache = torch.randn(1, 2, 2, 20, 16, generator=gen)
    cache_len = torch.tensor([0, 6])
    written = []
    for halves, block_t, num_warps in ((False, 16, 1), (True, 2, 4), (True, 8, 4), (False, 1, 1)):
        k_cache, v_cache = cache.clone(), cache.clone()
        kv_write_triton(k_cache, v_cache, 0, k, v, cache_len, cos, sin, block_t=block_t, num_warps=num_warps,
                        halves=halves)
        written.append((k_cache, v_cache))
    for k_cache, v_cache in written[1:]:
        assert torch.equal(k_cache, written[0][0]) and torch.equal(v_cache, written[0][1])
    assert not torch.equal(written[0][0], cache)


def test_launch_settings_follow_the_measured_rule():
    assert launch_settings(1, 64) == dict(block_t=1, num_warps=1, halves=False)
    assert launch_settings(18, 64) == dict(block_t=2, num_warps=4, halves=True)
    assert launch_settings(65, 128) == dict(block_t=8, num_warps=4, halves=True)
    assert launch_settings(65, 64, "tiles16") == dict(block_t=16, num_warps=1, halves=False)
    with pytest.raises(ValueError, match="use 'small' or 'tiles16'"):
        launch_settings(4, 64, "large")


def test_a_block_t_that_is_no_power_of_two_is_refused():
    cache = torch.randn(1, 1, 1, 8, 4)
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        kv_write_triton(cache, cache.clone(), 0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.tensor([0]),
                        block_t=3)


@interpreted
def test_kv_write_kernel_drops_positions_past_the_cache_end_and_touches_nothing_else():
    # The cache is a view into a larger buffer whose extra rows (positions >= S) are a guard:
    # a write past the end must be dropped, not land there.
    gen = torch.Generator().manual_seed(5)
    storage = torch.randn(1, 2, 2, 12, 8, generator=gen)
    cache = storage[:, :, :, :10]
    guard = storage[:, :, :, 10:].clone()
    v_storage = torch.randn(1, 2, 2, 12, 8, generator=gen)
    v_cache, v_guard = v_storage[:, :, :, :10], v_storage[:, :, :, 10:].clone()
    new, v_new = torch.randn(2, 2, 4, 8, generator=gen), torch.randn(2, 2, 4, 8, generator=gen)
    kv_write_triton(cache, v_cache, 0, new, v_new, torch.tensor([8, 3]))  # sequence 0: positions 8..11, 2 fit
    assert torch.equal(storage[:, :, :, 10:], guard) and torch.equal(v_storage[:, :, :, 10:], v_guard)
    assert torch.equal(cache[0, 0, :, 8:10], new[0, :, :2])
    assert torch.equal(cache[0, 1, :, 3:7], new[1])
    assert torch.equal(v_cache[0, 1, :, 3:7], v_new[1])


@interpreted
def test_kv_write_kernel_drops_negative_positions_and_touches_nothing_before_the_cache():
    # A cache_len below the number of new tokens' offset gives negative positions (a state no
    # real step has, but a CUDA-graph warm-up from zeros once did): position -1 of sequence 0,
    # head 0 is the memory before the cache. The cache is a view whose first two rows per head
    # are a guard.
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(1, 1, 2, 12, 8, generator=gen)
    cache = storage[:, :, :, 2:]
    guard = storage[:, :, :, :2].clone()
    v_storage = torch.randn(1, 1, 2, 12, 8, generator=gen)
    v_cache, v_guard = v_storage[:, :, :, 2:], v_storage[:, :, :, :2].clone()
    new, v_new = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen)
    kv_write_triton(cache, v_cache, 0, new, v_new, torch.tensor([-2]))  # positions -2..1: only 0 and 1 land
    assert torch.equal(storage[:, :, :, :2], guard) and torch.equal(v_storage[:, :, :, :2], v_guard)
    assert torch.equal(cache[0, 0, :, :2], new[0, :, 2:])
    assert torch.equal(v_cache[0, 0, :, :2], v_new[0, :, 2:])


@interpreted
def test_kv_write_kernel_source_is_listed_after_a_write():
    cache = torch.randn(1, 1, 1, 6, 8)
    kv_write_triton(cache, cache.clone(), 0, torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.tensor([1]))
    assert kernel_source(head_dim=8, block_t=launch_settings(3, 8)["block_t"]) in generated_sources().values()
    assert all(key.startswith("kv_write_") for key in generated_sources())


def test_kv_write_kernel_source_is_deterministic_and_specialised():
    source = kernel_source(head_dim=64, block_t=16)
    assert source == kernel_source(head_dim=64, block_t=16)
    assert "HEAD_DIM = tl.constexpr(64)" in source and "BLOCK_T = tl.constexpr(16)" in source
    assert source != kernel_source(head_dim=128, block_t=16)
    assert "ROPE = tl.constexpr(False)" in source
    assert "ROPE = tl.constexpr(True)" in kernel_source(head_dim=64, block_t=16, rope=True)
    compile(source, "<kv_write kernel>", "exec")


def test_kv_write_kernel_rejects_a_mismatched_new_before_launching():
    cache = torch.randn(1, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="does not fit cache"):
        kv_write_triton(cache, cache, 0, torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="K and V of one shape"):
        kv_write_triton(cache, cache, 0, torch.randn(2, 2, 1, 4), torch.randn(2, 2, 3, 4), torch.tensor([0, 0]))
