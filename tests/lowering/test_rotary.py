"""lowering/rotary.py: the ops' optional rotation means rotate-then-op, and bad tables are refused
with a message before anything runs (CPU: the ops' reference implementations)."""

from __future__ import annotations

import pytest
import torch

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.rotary import check_rotary, kernel_tables, rotate_reference
from specc.lowering.tree import ancestor_mask
from specc.models.llama import rotate_half as model_rotate_half


def _case(batch=2, n_heads=4, n_kv=2, steps=3, head_dim=8, capacity=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, steps, head_dim, generator=gen)
    k = torch.randn(batch, n_kv, steps, head_dim, generator=gen)
    v = torch.randn(batch, n_kv, steps, head_dim, generator=gen)
    cache = (torch.randn(1, batch, n_kv, capacity, head_dim, generator=gen),
             torch.randn(1, batch, n_kv, capacity, head_dim, generator=gen))
    cos, sin = torch.randn(batch, steps, head_dim, generator=gen), torch.randn(batch, steps, head_dim, generator=gen)
    cache_len = torch.tensor([0, 5][:batch])
    mask = ancestor_mask(torch.tensor([[-1, 0, 0]] * batch))
    return q, k, v, cache, cos, sin, cache_len, mask


def test_the_rotation_is_the_models():
    q, _, _, _, cos, sin, _, _ = _case()
    torch.testing.assert_close(rotate_reference(q, cos, sin), q * cos[:, None] + model_rotate_half(q) * sin[:, None])


def test_kv_write_with_tables_writes_the_rotated_keys():
    _, k, v, (k_cache, v_cache), cos, sin, cache_len, _ = _case()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch.ops.specc.kv_write(expected_k, expected_v, 0, rotate_reference(k, cos, sin), v, cache_len)
    torch.ops.specc.kv_write(k_cache, v_cache, 0, k, v, cache_len, cos, sin)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_tree_attention_with_tables_attends_with_the_rotated_queries():
    q, k, v, (k_cache, v_cache), cos, sin, cache_len, mask = _case()
    torch.ops.specc.kv_write(k_cache, v_cache, 0, k, v, cache_len)
    expected = torch.ops.specc.tree_attention(rotate_reference(q, cos, sin), k_cache, v_cache, 0, cache_len, mask, 0.3)
    got = torch.ops.specc.tree_attention(q, k_cache, v_cache, 0, cache_len, mask, 0.3, cos, sin)
    assert torch.equal(got, expected)
    # one table row for every sequence broadcasts
    shared = torch.ops.specc.tree_attention(q, k_cache, v_cache, 0, cache_len, mask, 0.3, cos[:1], sin[:1])
    torch.testing.assert_close(shared, torch.ops.specc.tree_attention(
        rotate_reference(q, cos[:1], sin[:1]), k_cache, v_cache, 0, cache_len, mask, 0.3))


@pytest.mark.parametrize("tables, message", [
    (lambda c, s: (c, None), "give both rope_cos and rope_sin"),
    (lambda c, s: (c[:, :2], s[:, :2]), r"rope_cos must be \[2 or 1, 3, 8\]"),
    (lambda c, s: (c, s.to(torch.int64)), "rope_sin must be a floating tensor"),
])
def test_bad_tables_are_refused_with_what_they_must_be(tables, message):
    q, k, v, (k_cache, v_cache), cos, sin, cache_len, mask = _case()
    cos, sin = tables(cos, sin)
    with pytest.raises(ValueError, match=message):
        torch.ops.specc.tree_attention(q, k_cache, v_cache, 0, cache_len, mask, 0.3, cos, sin)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=message):
        torch.ops.specc.kv_write(k_cache, v_cache, 0, k, v, cache_len, cos, sin)
    assert torch.equal(k_cache, before)  # nothing written


def test_an_odd_head_dim_cannot_be_rotated():
    x = torch.randn(1, 2, 3, 5)
    with pytest.raises(ValueError, match="even head dim; got 5"):
        check_rotary(x, torch.randn(1, 3, 5), torch.randn(1, 3, 5), "kv_write")


def test_kernel_tables_share_one_set_of_strides():
    cos = torch.randn(3, 8, 4).transpose(0, 1)  # [8, 3, 4], not contiguous
    sin = torch.randn(8, 3, 4)
    (a, b), strides = kernel_tables(cos, sin, unused=sin)
    assert a.stride() == b.stride() and a.stride(-1) == 1 and torch.equal(a, cos)
    assert strides == (12, 4)
    same = torch.randn(8, 3, 4)
    assert kernel_tables(same, sin, unused=sin)[0][0] is same


def test_kernel_tables_give_one_row_for_all_a_zero_batch_stride_and_none_placeholders():
    one_row = torch.randn(1, 3, 4)
    assert kernel_tables(one_row, one_row.clone(), unused=one_row)[1] == (0, 4)
    placeholder = torch.randn(2)
    (a, b), strides = kernel_tables(None, None, unused=placeholder)
    assert a is placeholder and b is placeholder and strides == (0, 0)
