"""specc::kv_write_attention: kv_write then tree_attention in one launch. The op against the two
ops in sequence (CPU), its argument checks and opcheck, and the kernel's WRITE_KV mode against
the reference in Triton's interpreter (tests/lowering/interpreter.py): the attention output and
every element of both caches, split and unsplit launches, with and without rotary tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.kv_write_attention import kv_write_attention_reference
from specc.lowering.rotary import rotate_reference
from tests.lowering.interpreter import interpreted
from tests.lowering.test_tree_attention_kernel import TOLERANCE, attention_cases, make_inputs, rotary_tables

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def new_kv(case: dict, k_cache: torch.Tensor):
    """The step's new K and V [B, Hkv, T, D] (K heads-last in memory when the case says so)."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    batch, n_kv, steps, head_dim = k_cache.shape[1], k_cache.shape[2], len(case["parents"][0]), k_cache.shape[4]
    k = torch.randn(batch, steps, n_kv, head_dim, generator=gen).transpose(1, 2)
    v = torch.randn(batch, n_kv, steps, head_dim, generator=gen)
    return k.to(case["dtype"]), v.to(case["dtype"])


def test_the_op_is_kv_write_then_tree_attention():
    case = dict(batch=2, n_kv=2, group=2, head_dim=8, parents=[[-1, 0, 0, 1], [-1, 0, 1, 1]], cache_len=[3, 9],
                spare=2, n_layers=2, layer=1, dtype=torch.float32, num_splits=None, heads_last=True,
                score_scale=1.0, seed=5)
    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    k, v = new_kv(case, k_cache)
    for tables in ((None, None), rotary_tables(2, 4, 8, torch.float32, 5, shared=True)):
        fused_caches, two_op_caches = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
        out = torch.ops.specc.kv_write_attention(q, k, v, *fused_caches, 1, cache_len, tree_mask, 0.3, *tables)
        torch.ops.specc.kv_write(*two_op_caches, 1, k, v, cache_len, *tables)
        expected = torch.ops.specc.tree_attention(q, *two_op_caches, 1, cache_len, tree_mask, 0.3, *tables)
        assert torch.equal(out, expected)
        assert torch.equal(fused_caches[0], two_op_caches[0]) and torch.equal(fused_caches[1], two_op_caches[1])
        assert not torch.equal(fused_caches[1], v_cache)  # it wrote


def test_the_op_names_misshapen_k_or_v_and_passes_opcheck():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    k_cache, v_cache = torch.zeros(1, 1, 2, 10, 8), torch.zeros(1, 1, 2, 10, 8)
    cache_len, mask = torch.tensor([2]), torch.ones(1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"k and v must be \[B, Hkv, T, D\] = \[1, 2, 3, 8\]"):
        torch.ops.specc.kv_write_attention(q, k[:, :, :2], v[:, :, :2], k_cache, v_cache, 0, cache_len, mask, 0.3)
    with pytest.raises(ValueError, match="k and v .* of one shape"):
        torch.ops.specc.kv_write_attention(q, k, v[:, :1], k_cache, v_cache, 0, cache_len, mask, 0.3)
    torch.library.opcheck(torch.ops.specc.kv_write_attention.default,
                          (q, k, v, k_cache, v_cache, 0, cache_len, mask, 0.3))


@interpreted
@settings(max_examples=40, deadline=None)
@given(case=attention_cases(), rope=st.sampled_from(["none", "shared", "per sequence"]))
def test_the_kernel_writing_kv_equals_the_reference(case, rope):
    # The caches start random, so an attention that read the tree's keys from the cache instead
    # of k/v, or a write that missed a node or landed elsewhere, shows in the comparison.
    from specc.lowering.tree_attention_triton import tree_attention_triton

    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    k, v = new_kv(case, k_cache)
    batch, _, steps, head_dim = q.shape
    tables = (None, None) if rope == "none" else rotary_tables(batch, steps, head_dim, case["dtype"], case["seed"],
                                                                shared=rope == "shared")
    scale = head_dim ** -0.5
    want_k, want_v = k_cache.clone(), v_cache.clone()
    if rope == "none":
        expected = kv_write_attention_reference(q, k, v, want_k, want_v, case["layer"], cache_len, tree_mask, scale)
    else:  # the kernels rotate in fp32 and round once (the reference op rotates in the inputs' dtype)
        rotated_q, rotated_k = (rotate_reference(x.float(), *(t.float() for t in tables)).to(x.dtype) for x in (q, k))
        expected = kv_write_attention_reference(rotated_q, rotated_k, v, want_k, want_v, case["layer"], cache_len,
                                                tree_mask, scale)
    out = torch.full_like(q, float("nan"))
    tree_attention_triton(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale, out=out,
                          num_splits=case["num_splits"], rope_cos=tables[0], rope_sin=tables[1], new_kv=(k, v),
                          write_kv_in_launch=True)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[case["dtype"]])
    assert torch.equal(v_cache, want_v)
    if rope == "none":
        assert torch.equal(k_cache, want_k)
    else:  # rotated in fp32 by the kernel and above, rounded once (the kernel may contract into FMAs)
        torch.testing.assert_close(k_cache, want_k, atol=1e-6 if case["dtype"] == torch.float32 else 1e-3, rtol=1e-3)


@interpreted
def test_many_row_tiles_write_kv_in_a_launch_of_its_own_with_the_same_result(monkeypatch):
    # 2 tokens x 4 query heads per KV head fill 1 row tile (fp32 tiles hold 16 rows), 40 tokens
    # fill 10: past MAX_WRITE_KV_ROW_TILES the default writes with kv_write first
    from specc.lowering import kv_write_triton as kv_write_module
    from specc.lowering.tree_attention_triton import MAX_WRITE_KV_ROW_TILES, tree_attention_triton

    assert -(-2 * 4 // 16) <= MAX_WRITE_KV_ROW_TILES < -(-40 * 4 // 16)  # the cases straddle the rule
    writes = []
    honest = kv_write_module.kv_write_triton
    monkeypatch.setattr(kv_write_module, "kv_write_triton", lambda *args: writes.append(1) or honest(*args))
    for steps, in_launch, one_launch in ((2, None, True), (40, None, False), (40, True, True), (2, False, False)):
        writes.clear()
        case = dict(batch=2, n_kv=2, group=4, head_dim=8, parents=[list(range(-1, steps - 1))] * 2, cache_len=[3, 30],
                    spare=steps, n_layers=2, layer=1, dtype=torch.float32, num_splits=None, heads_last=False,
                    score_scale=1.0, seed=steps)
        q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
        k, v = new_kv(case, k_cache)
        cos, sin = rotary_tables(2, steps, 8, torch.float32, 3, shared=False)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        rotated_q, rotated_k = (rotate_reference(x, cos, sin) for x in (q, k))
        expected = kv_write_attention_reference(rotated_q, rotated_k, v, want_k, want_v, 1, cache_len, tree_mask, 0.3)
        out = tree_attention_triton(q, k_cache, v_cache, 1, cache_len, tree_mask, 0.3, rope_cos=cos, rope_sin=sin,
                                    new_kv=(k, v), write_kv_in_launch=in_launch)
        assert writes == ([] if one_launch else [1]), (steps, in_launch)
        torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
        torch.testing.assert_close(k_cache, want_k, atol=1e-6, rtol=1e-5)
        assert torch.equal(v_cache, want_v)


@interpreted
def test_the_kernel_writing_kv_drops_positions_past_the_cache_end_as_kv_write_does():
    # cache_len + T > S: kv_write stores the nodes that fit and drops the rest; so does this
    from specc.lowering.kv_write_triton import kv_write_triton
    from specc.lowering.tree_attention_triton import tree_attention_triton

    case = dict(batch=2, n_kv=1, group=2, head_dim=8, parents=[[-1, 0, 1, 2, 3], [-1, 0, 0, 1, 1]], cache_len=[7, 2],
                spare=0, n_layers=1, layer=0, dtype=torch.float32, num_splits=None, heads_last=False,
                score_scale=1.0, seed=9)
    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    cache_len[0] = 9  # nodes 0-2 of sequence 0 fit below S = 12, nodes 3-4 do not
    k, v = new_kv(case, k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write_triton(want_k, want_v, 0, k, v, cache_len)
    for num_splits in (0, 2):
        got_k, got_v = k_cache.clone(), v_cache.clone()
        tree_attention_triton(q, got_k, got_v, 0, cache_len, tree_mask, 0.3, num_splits=num_splits, new_kv=(k, v))
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_the_kernel_refuses_misshapen_new_kv_before_launching():
    from specc.lowering.tree_attention_triton import tree_attention_triton

    q, k_cache = torch.randn(1, 4, 3, 8), torch.zeros(1, 1, 2, 10, 8)
    mask = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"v must be a floating \[B, Hkv, T, D\] = \[1, 2, 3, 8\]"):
        tree_attention_triton(q, k_cache, k_cache.clone(), 0, torch.tensor([1]), mask, 0.3,
                              new_kv=(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8).long()))
