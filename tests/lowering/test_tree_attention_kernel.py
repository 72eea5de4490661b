"""The generated tree-attention kernel (lowering/tree_attention_triton.py) equals the reference
and torch's SDPA with the equivalent dense mask, run through Triton's interpreter on the CPU
(tests/lowering/interpreter.py says how).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be interpreted")

from specc.lowering.tree import ancestor_mask  # noqa: E402
from specc.lowering.tree_attention import tree_attention_reference  # noqa: E402
from specc.lowering.tree_attention_triton import generated_sources, kernel_source, tree_attention_triton  # noqa: E402
from tests.lowering.interpreter import interpreted  # noqa: E402
from tests.strategies import tree_parents  # noqa: E402

# Triton 3.6's interpreter turns loop bounds into ints through a numpy conversion that numpy
# deprecates (once per kernel loop); the kernels are not at fault.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# ------------------------------------------------------------------------------- the cases


def dense_visible(cache_len: torch.Tensor, tree_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool [B, T, S]: query t of sequence b sees cache position p (the op's meaning, densely)."""
    batch, steps, _ = tree_mask.shape
    positions = torch.arange(capacity)
    visible = (positions[None, None, :] < cache_len[:, None, None]).expand(batch, steps, capacity).clone()
    for b in range(batch):
        start = int(cache_len[b])
        visible[b, :, start : start + steps] = tree_mask[b]
    return visible


@st.composite
def attention_cases(draw, max_steps: int = 12, max_cache: int = 80):
    batch = draw(st.integers(1, 3))
    steps = draw(st.integers(1, max_steps))
    n_layers = draw(st.integers(1, 2))
    return dict(
        batch=batch,
        n_kv=draw(st.sampled_from([1, 2, 3])),
        group=draw(st.sampled_from([1, 2, 3])),
        head_dim=draw(st.sampled_from([8, 16, 24])),  # 8 and 24 exercise the padded D tile
        parents=[draw(tree_parents(min_nodes=steps, max_nodes=steps)) for _ in range(batch)],
        cache_len=draw(st.lists(st.integers(0, max_cache), min_size=batch, max_size=batch)),
        spare=draw(st.integers(0, 5)),
        n_layers=n_layers,
        layer=draw(st.integers(0, n_layers - 1)),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        num_splits=draw(st.sampled_from([None, 0, 1, 2, 3, 7])),  # 0: fused, no split
        heads_last=draw(st.booleans()),  # q as a [B, T, Hq, D] tensor seen as [B, Hq, T, D]
        score_scale=draw(st.sampled_from([1.0, 1.0, 20.0])),  # 20: near one-hot softmax rows
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: dict):
    gen = torch.Generator().manual_seed(case["seed"])
    batch, n_kv, group, head_dim = case["batch"], case["n_kv"], case["group"], case["head_dim"]
    steps = len(case["parents"][0])
    n_heads = n_kv * group
    cache_len = torch.tensor(case["cache_len"], dtype=torch.int32)
    capacity = int(cache_len.max()) + steps + case["spare"]
    dtype = case["dtype"]
    if case["heads_last"]:
        q = torch.randn(batch, steps, n_heads, head_dim, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(batch, n_heads, steps, head_dim, generator=gen)
    q = (q * case["score_scale"]).to(dtype)
    shape = (case["n_layers"], batch, n_kv, capacity, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    tree_mask = ancestor_mask(torch.tensor(case["parents"], dtype=torch.int32))
    return q, k_cache, v_cache, cache_len, tree_mask


def run_kernel(q, k_cache, v_cache, layer, cache_len, tree_mask, scale, **kwargs):
    out = torch.empty_like(q).fill_(float("nan"))  # poisoned: an unwritten element stays NaN
    returned = tree_attention_triton(q, k_cache, v_cache, layer, cache_len, tree_mask, scale, out=out, **kwargs)
    assert returned is out
    assert not out.isnan().any(), "the kernel left output elements unwritten"
    return out


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


# ------------------------------------------------------------------------------- the tests


@interpreted
@settings(max_examples=60, deadline=None)
@given(case=attention_cases())
@example(case=dict(batch=2, n_kv=3, group=3, head_dim=16, parents=[[-1, 0, 0, 1], [-1, 0, 1, 2]], cache_len=[0, 70],
                   spare=0, n_layers=2, layer=1, dtype=torch.float16, num_splits=None, heads_last=True,
                   score_scale=1.0, seed=1))
def test_tree_attention_kernel_equals_reference(case):
    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    scale = case["head_dim"] ** -0.5
    out = run_kernel(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale, num_splits=case["num_splits"])
    expected = tree_attention_reference(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[case["dtype"]])


def rotary_tables(batch: int, steps: int, head_dim: int, dtype: torch.dtype, seed: int, shared: bool):
    """Llama cos/sin tables [B or 1, T, D] at random positions (shared: one row for all sequences)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (1 if shared else batch, steps), generator=gen)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@interpreted
@settings(max_examples=30, deadline=None)
@given(case=attention_cases(), shared=st.booleans())
def test_the_kernel_rotating_q_equals_the_reference_on_the_rotated_q(case, shared):
    # With rope_cos/rope_sin the kernel gets q before its rotary embedding and rotates it on
    # load; the reference rotates it with the model's formula first.
    from specc.lowering.rotary import rotate_reference

    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    batch, _, steps, head_dim = q.shape
    cos, sin = rotary_tables(batch, steps, head_dim, case["dtype"], case["seed"], shared)
    scale = head_dim ** -0.5
    out = run_kernel(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale, num_splits=case["num_splits"],
                     rope_cos=cos, rope_sin=sin)
    rotated = rotate_reference(q.float(), cos.float(), sin.float()).to(q.dtype)
    expected = tree_attention_reference(rotated, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[case["dtype"]])


@interpreted
@settings(max_examples=20, deadline=None)
@given(case=attention_cases(max_steps=6, max_cache=200), num_splits=st.sampled_from([3, 7, 9]))
def test_the_merge_ignores_what_empty_chunks_left_in_their_scratch(case, num_splits):
    # The merge loads every part's partial output whether or not the part saw a key; a chunk
    # past cache_len writes none, so its rows hold whatever the scratch held. Scratch full of
    # NaN (torch.empty promises nothing) must not reach the output.
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    scale = case["head_dim"] ** -0.5
    expected = tree_attention_reference(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        out = run_kernel(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale, num_splits=num_splits)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[case["dtype"]])


def test_merge_programs_hold_at_most_16k_partial_values():
    from specc.lowering.tree_attention_triton import _merge_rows

    assert _merge_rows(10, 64) == 16  # SmolLM2, 9 chunks + the tree: 10 x 16 x 64 = 10,240
    assert _merge_rows(34, 128) == 2  # Llama-3-8B's one-token step: 33 chunks + the tree
    assert _merge_rows(8, 128) == 16
    assert _merge_rows(200, 256) == 1
    assert all(parts * _merge_rows(parts, d) * d <= 16384 or _merge_rows(parts, d) == 1
               for parts in range(2, 70) for d in (16, 32, 64, 128, 256))


@interpreted
@settings(max_examples=30, deadline=None)
@given(case=attention_cases(), min_chunk=st.sampled_from([0, 64, 256]))
def test_the_folded_merge_equals_the_reference_and_leaves_its_counters_at_zero(case, min_chunk):
    # The tile's last program merges (no merge kernel); min_chunk 0 keeps every chunk of the
    # split busy, 256 makes these short caches one chunk and the other chunk programs empty.
    from specc.lowering import tree_attention_triton as module

    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    scale = case["head_dim"] ** -0.5
    num_splits = case["num_splits"] or 2  # a split: the fold has nothing to do without one
    expected = tree_attention_reference(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale)
    for _ in range(2):  # the second call finds the counters the first one reset
        out = run_kernel(q, k_cache, v_cache, case["layer"], cache_len, tree_mask, scale, num_splits=num_splits,
                         fold_merge=True, min_chunk=min_chunk)
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[case["dtype"]])
        assert not module._COUNTERS[q.device].any()
    source = kernel_source(head_dim=case["head_dim"], gqa_group=case["group"],
                           dtype="float32" if case["dtype"] == torch.float32 else "float16",
                           block_m=16 if case["dtype"] == torch.float32 else
                           module._decode_blocks(len(case["parents"][0]) * case["group"], case["head_dim"])[0],
                           block_n=64, split_kv=True, fold_merge=True)
    assert source in generated_sources().values()


@interpreted
@settings(max_examples=20, deadline=None)
@given(case=attention_cases(max_steps=8, max_cache=40))
def test_tree_attention_kernel_equals_sdpa_with_dense_mask(case):
    case = {**case, "dtype": torch.float32}
    q, k_cache, v_cache, cache_len, tree_mask = make_inputs(case)
    layer, scale = case["layer"], 0.3
    out = run_kernel(q, k_cache, v_cache, layer, cache_len, tree_mask, scale)
    visible = dense_visible(cache_len, tree_mask, k_cache.shape[3])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache[layer], v_cache[layer], attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@interpreted
def test_tree_attention_kernel_prefill_tiles_the_queries():
    # Prefill is the chain tree: T spans several query tiles (fp16 unsplit: BLOCK_M = 128 rows =
    # 42 tokens of a group of 3; fp16 split and fp32: 16 rows), so the causal key skipping of
    # every tile counts.
    # Sequence 0 starts empty; sequence 1 is a chunked prefill after 37 cached tokens.
    steps, n_kv, group, head_dim = 100, 1, 3, 16
    for dtype in (torch.float16, torch.float32):
        gen = torch.Generator().manual_seed(7)
        q = torch.randn(2, n_kv * group, steps, head_dim, generator=gen).to(dtype)
        k_cache = torch.randn(1, 2, n_kv, 160, head_dim, generator=gen).to(dtype)
        v_cache = torch.randn(1, 2, n_kv, 160, head_dim, generator=gen).to(dtype)
        cache_len = torch.tensor([0, 37])
        causal = torch.ones(steps, steps, dtype=torch.bool).tril().expand(2, steps, steps)
        expected = tree_attention_reference(q, k_cache, v_cache, 0, cache_len, causal, head_dim**-0.5)
        for num_splits in (None, 2):  # None: fused here (the row tiles fill the interpreter's "GPU")
            out = run_kernel(q, k_cache, v_cache, 0, cache_len, causal, head_dim**-0.5, num_splits=num_splits)
            torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


@interpreted
def test_tree_attention_kernel_row_seeing_only_itself_returns_its_value():
    # Empty prefix and a mask that is just the diagonal: softmax over one key is 1, so every
    # output row is exactly the V of its own position (also the root's case in a real tree).
    # T > BLOCK_N (64): rows past the first key block see no key in it, the -inf/-inf case.
    gen = torch.Generator().manual_seed(3)
    steps, head_dim = 70, 16
    q = torch.randn(1, 4, steps, head_dim, generator=gen)
    k_cache = torch.randn(1, 1, 2, steps + 3, head_dim, generator=gen)
    v_cache = torch.randn(1, 1, 2, steps + 3, head_dim, generator=gen)
    identity = torch.eye(steps, dtype=torch.bool)[None]
    expected = v_cache[0, 0].repeat_interleave(2, dim=0)[:, :steps]
    for num_splits in (0, 3):
        out = run_kernel(q, k_cache, v_cache, 0, torch.tensor([0]), identity, 0.25, num_splits=num_splits)
        torch.testing.assert_close(out[0], expected, atol=0, rtol=0)


@interpreted
def test_a_negative_cache_len_reads_nothing_before_the_cache():
    # cache_len = -1 puts tree node 0 at position -1: the memory before the cache for b = h = 0.
    # There K is 0 and V is 1e4 here; had the kernel read it, the rows that see node 0 would
    # carry a large share of 1e4. Node j >= 1 is at position j - 1 and is read as usual, so every
    # output is a mix of the cache's own V (|V| < 10).
    gen = torch.Generator().manual_seed(4)
    steps, head_dim = 3, 8
    storage = torch.zeros(2, 1, 1, 9, head_dim)
    storage[0, ..., 1:, :] = torch.randn(1, 1, 8, head_dim, generator=gen)
    storage[1, ..., 1:, :] = torch.randn(1, 1, 8, head_dim, generator=gen)
    storage[1, ..., 0, :] = 1e4
    k_cache, v_cache = storage[0:1, ..., 1:, :], storage[1:2, ..., 1:, :]
    q = torch.randn(1, 2, steps, head_dim, generator=gen)
    causal = torch.ones(1, steps, steps, dtype=torch.bool).tril()
    for num_splits in (0, 2):
        out = run_kernel(q, k_cache, v_cache, 0, torch.tensor([-1]), causal, 0.3, num_splits=num_splits)
        assert out.abs().max() < 10, (num_splits, out.abs().max())


@interpreted
def test_kernel_output_is_laid_out_like_q_and_listed_in_generated_sources():
    # Without out=, the result has torch.empty_like(q)'s strides, as the fake implementation says.
    q = torch.randn(1, 3, 2, 24).transpose(1, 2)  # [B, Hq, T, D] view of a [B, T, Hq, D] tensor
    cache = torch.randn(1, 1, 1, 8, 24)
    mask = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    expected = tree_attention_reference(q, cache, cache, 0, torch.tensor([2]), mask, 0.2)
    for num_splits, split_kv in ((0, False), (2, True)):
        out = tree_attention_triton(q, cache, cache, 0, torch.tensor([2]), mask, 0.2, num_splits=num_splits)
        assert out.stride() == torch.empty_like(q).stride() and out.dtype == q.dtype
        torch.testing.assert_close(out, expected)
        source = kernel_source(head_dim=24, gqa_group=2, dtype="float32", block_m=16, block_n=64, split_kv=split_kv)
        assert source in generated_sources().values()
    assert all(key.startswith("tree_attention_") for key in generated_sources())


def test_split_launches_take_the_decode_tiles_and_unsplit_ones_the_large_tiles(monkeypatch):
    from specc.lowering import tree_attention_triton as module

    monkeypatch.setattr(module, "_sm_count", lambda index: 132)  # an H200's SMs; nothing runs
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    # a 64-node verify of SmolLM2 (Hkv 3, group 3, D 64): 12 tiles of 16 rows, 36 programs, so
    # 6 prefix chunks (1.5 programs per SM: several row tiles) of a 2,240-key capacity
    assert module._choose_launch(64 * 3, 3, 64, bf16, 2240, gpu, None) == (16, 64, 4, 3, 6)
    # Llama-3-8B's D = 128: 64-row tiles (16-row ones read K/V too often at long contexts);
    # 4 tiles x 8 KV heads = 32 programs, 7 chunks
    assert module._choose_launch(64 * 4, 8, 128, bf16, 8256, gpu, None) == (64, 64, 4, 3, 7)
    # plain decode, one token: the tile is the 16 rows it always was, and one row tile per KV
    # head aims at 2 programs per SM: 3 programs want 88 chunks, the capacity allows 9
    assert module._choose_launch(3, 3, 64, bf16, 2303, gpu, None) == (16, 64, 4, 3, 9)
    # Llama-3-8B's one-token step: 8 programs, 33 chunks (264 / 8), as many as 8,319 keys allow
    assert module._choose_launch(4, 8, 128, bf16, 8319, gpu, None) == (16, 64, 4, 3, 33)
    # a count given by the caller: > 0 takes the decode tiles, 0 (fused) the large ones
    assert module._choose_launch(192, 3, 64, bf16, 2240, gpu, 4) == (16, 64, 4, 3, 4)
    assert module._choose_launch(192, 3, 64, bf16, 2240, gpu, 0) == (*module._choose_blocks(192, 64, bf16), 0)
    # a prefill of 2,048 tokens at batch 4 fills the GPU with large tiles alone: no split
    assert module._choose_launch(2048 * 3, 4 * 3, 64, bf16, 4096, gpu, None) == (*module._choose_blocks(6144, 64, bf16), 0)
    # fp32 (the exact mode) keeps its 16 x 64 tiles whatever the split
    assert module._choose_launch(192, 3, 64, torch.float32, 2240, gpu, None)[:4] == module._choose_blocks(192, 64, torch.float32)


def test_kernel_source_is_deterministic_and_specialised():
    params = dict(head_dim=64, gqa_group=3, dtype="bfloat16", block_m=128, block_n=64, split_kv=True)
    source = kernel_source(**params)
    assert source == kernel_source(**params)
    for line in ("HEAD_DIM = tl.constexpr(64)", "GROUP = tl.constexpr(3)", "BLOCK_M = tl.constexpr(128)",
                 'DOT_PRECISION = tl.constexpr("tf32")'):
        assert line in source
    assert 'DOT_PRECISION = tl.constexpr("ieee")' in kernel_source(**{**params, "dtype": "float32"})
    assert source != kernel_source(**{**params, "gqa_group": 4})
    assert "SPLIT_KV = tl.constexpr(False)" in kernel_source(**{**params, "split_kv": False})
    assert "FOLD_MERGE = tl.constexpr(True)" in kernel_source(**params, fold_merge=True)
    assert "FOLD_MERGE = tl.constexpr(False)" in kernel_source(**{**params, "split_kv": False}, fold_merge=True)
    assert "ROPE = tl.constexpr(False)" in source
    assert "ROPE = tl.constexpr(True)" in kernel_source(**params, rope=True) == kernel_source(**params, rope=True)
    compile(source, "<tree_attention kernel>", "exec")  # valid Python


def test_tree_attention_kernel_rejects_mixed_dtypes_before_launching():
    q = torch.randn(1, 2, 3, 8)
    cache = torch.randn(1, 1, 1, 8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="one dtype"):
        tree_attention_triton(q, cache, cache, 0, torch.tensor([2]), torch.ones(1, 3, 3, dtype=torch.bool), 0.3)


def test_dense_visible_matches_the_definition():
    # The SDPA comparison's mask helper, checked on one hand-written case.
    mask = ancestor_mask(torch.tensor([[-1, 0, 0]]))
    visible = dense_visible(torch.tensor([2]), mask, 6)
    assert visible[0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
