"""The generated kv_write and tree-attention kernels on a CUDA GPU at the real shapes
(SmolLM2: Hq=9, Hkv=3, D=64; Llama-3-8B: Hq=32, Hkv=8, D=128), against float64 references.

Errors are ‖out − ref‖ / ‖ref‖, over the whole output and per query row (a single wrong row
hides in a large norm): bf16/fp16 inputs land near 3e-3, fp32 (IEEE fp32 dots, no tf32) near 1e-6.
Every output is poisoned with NaN before the kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from specc.lowering.kv_write import kv_write_reference
from specc.lowering.tree import ancestor_mask

pytestmark = pytest.mark.gpu

SHAPES = {"smollm2": (9, 3, 64), "llama3_8b": (32, 8, 128)}  # (Hq, Hkv, D)
THRESHOLD = {  # (whole tensor, worst row)
    torch.bfloat16: (1e-2, 3e-2),
    torch.float16: (5e-3, 1.5e-2),
    torch.float32: (2e-5, 1e-4),
}


def attention_fp64(q, k_cache, v_cache, layer, cache_len, tree_mask, scale):
    """The op's meaning (see tree_attention_reference) in float64."""
    batch, n_heads, steps, _ = q.shape
    group = n_heads // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(batch):
        length = int(cache_len[b])
        keys = k_cache[layer, b, :, : length + steps].double().repeat_interleave(group, dim=0)
        values = v_cache[layer, b, :, : length + steps].double().repeat_interleave(group, dim=0)
        visible = torch.cat([torch.ones(steps, length, dtype=torch.bool, device=q.device), tree_mask[b]], dim=1)
        scores = (q[b].double() @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        out[b] = scores.softmax(-1) @ values
    return out


def assert_close_relative(out, expected, dtype):
    assert not out.isnan().any(), "NaN in the output (unwritten element or bad arithmetic)"
    whole, per_row = THRESHOLD[dtype]
    diff = out.double() - expected
    error = (diff.norm() / expected.norm()).item()
    row_error = (diff.norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-30)).max().item()
    assert error < whole and row_error < per_row, f"relative error {error:.2e} (worst row {row_error:.2e}) for {dtype}"


def random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed, max_cache=4096):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    device = "cuda"
    cache_len = torch.randint(0, max_cache + 1, (batch,), generator=gen, device=device, dtype=torch.int32)
    cache_len[0] = 0
    if batch > 1:
        cache_len[1] = max_cache
    capacity = max_cache + steps + 5
    q = torch.randn(batch, steps, n_heads, head_dim, generator=gen, device=device).transpose(1, 2).to(dtype)
    k_cache = torch.randn(2, batch, n_kv, capacity, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(2, batch, n_kv, capacity, head_dim, generator=gen, device=device).to(dtype)
    if steps > 64:  # a prefill chunk: the chain tree (causal mask)
        tree_mask = torch.ones(steps, steps, dtype=torch.bool, device=device).tril().expand(batch, steps, steps)
    else:
        rows = []
        for _ in range(batch):
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen, device=device)) for i in range(1, steps)]
            rows.append(parents)
        tree_mask = ancestor_mask(torch.tensor(rows, dtype=torch.int32, device=device))
    return q, k_cache, v_cache, cache_len, tree_mask.contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("steps", [1, 16, 64, 300])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_tree_attention_kernel_matches_fp64_reference_on_gpu(shape, steps, dtype):
    from specc.lowering.tree_attention_triton import tree_attention_triton

    n_heads, n_kv, head_dim = SHAPES[shape]
    batches = [1, 3] if shape == "smollm2" else ([4, 32] if steps == 1 else [4])
    for seed, batch in enumerate(batches):
        q, k_cache, v_cache, cache_len, tree_mask = random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed)
        scale = head_dim**-0.5
        out = torch.full_like(q, float("nan"))
        tree_attention_triton(q, k_cache, v_cache, 1, cache_len, tree_mask, scale, out=out)
        torch.cuda.synchronize()
        expected = attention_fp64(q, k_cache, v_cache, 1, cache_len, tree_mask, scale)
        assert_close_relative(out, expected, dtype)


@pytest.mark.parametrize("steps", [7, 24, 64])
def test_the_split_launch_tiles_are_as_accurate_as_the_large_tiles(steps):
    # When split launches took 16-row tiles (H200, 2026-12-03), the shipped head's MT-Bench
    # accept length fell from 3.51 to 3.41 (BENCHMARKS.md, tenth run); a less exact kernel
    # would explain it. Both tiles, each with its own split count, against float64, at
    # SmolLM2's heads, a decode step's node counts and the benchmark's 2,304-position cache.
    from specc.lowering.tree_attention_triton import _choose_blocks, _decode_blocks, tree_attention_triton

    n_heads, n_kv, head_dim = SHAPES["smollm2"]
    rows = steps * (n_heads // n_kv)
    tiles = {"decode": _decode_blocks(rows, head_dim), "large": _choose_blocks(rows, head_dim, torch.bfloat16)}
    errors = {}
    for name, blocks in tiles.items():
        samples = []
        for seed in range(8):
            q, k_cache, v_cache, _, tree_mask = random_case(n_heads, n_kv, head_dim, 1, steps, torch.bfloat16, seed,
                                                            max_cache=2304 - steps - 5)
            cache_len = torch.tensor([100 + 60 * seed], dtype=torch.int32, device="cuda")  # MT-Bench's contexts
            out = tree_attention_triton(q, k_cache, v_cache, 1, cache_len, tree_mask, head_dim**-0.5, blocks=blocks)
            expected = attention_fp64(q, k_cache, v_cache, 1, cache_len, tree_mask, head_dim**-0.5)
            samples.append(((out.double() - expected).norm() / expected.norm()).item())
        errors[name] = sum(samples) / len(samples)
    assert errors["decode"] <= 1.25 * errors["large"], f"mean relative error against float64: {errors} ({tiles})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("steps", [1, 16, 64, 300])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_kv_write_kernel_matches_reference_on_gpu(shape, steps, dtype):
    from specc.lowering.kv_write_triton import kv_write_triton

    _, n_kv, head_dim = SHAPES[shape]
    batch = 4
    gen = torch.Generator(device="cuda").manual_seed(steps)
    cache = torch.randn(2, batch, n_kv, 4096 + steps, head_dim, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(2, batch, n_kv, 4096 + steps, head_dim, generator=gen, device="cuda").to(dtype)
    new = torch.randn(batch, steps, n_kv, head_dim, generator=gen, device="cuda").transpose(1, 2).to(dtype)
    v_new = torch.randn(batch, n_kv, steps, head_dim, generator=gen, device="cuda").to(dtype)
    cache_len = torch.tensor([0, 4096, 17, 1000], device="cuda")
    expected, v_expected = cache.clone(), v_cache.clone()
    kv_write_reference(expected, 1, new, cache_len)
    kv_write_reference(v_expected, 1, v_new, cache_len)
    kv_write_triton(cache, v_cache, 1, new, v_new, cache_len)
    torch.cuda.synchronize()
    assert torch.equal(cache, expected) and torch.equal(v_cache, v_expected)


def llama_tables(batch, steps, head_dim, dtype, shared):
    """cos, sin [B or 1, T, D] of the Llama rotation at positions up to 8K."""
    positions = torch.randint(0, 8192, (1 if shared else batch, steps), device="cuda")
    inv_freq = 500000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device="cuda") / head_dim)
    emb = (positions[..., None].float() * inv_freq).repeat(1, 1, 2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("steps", [1, 64, 300])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_the_kernels_rotating_q_and_k_match_the_rotated_references_on_gpu(shape, steps, dtype):
    # passes/rotary_fusion.py hands the kernels q and k before their rotation: attention over a
    # rotated q against float64 on the q the model would have rotated, and the cache rows
    # written from k against the model's rotation (computed in fp32, rounded once)
    from specc.lowering.kv_write_triton import kv_write_triton
    from specc.lowering.rotary import rotate_reference
    from specc.lowering.tree_attention_triton import tree_attention_triton

    n_heads, n_kv, head_dim = SHAPES[shape]
    for seed, (batch, shared) in enumerate([(1, True), (3, False)]):
        q, k_cache, v_cache, cache_len, tree_mask = random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed,
                                                                max_cache=2000)
        cos, sin = llama_tables(batch, steps, head_dim, dtype, shared)
        out = torch.full_like(q, float("nan"))
        tree_attention_triton(q, k_cache, v_cache, 1, cache_len, tree_mask, head_dim**-0.5, out=out,
                              rope_cos=cos, rope_sin=sin)
        rotated = rotate_reference(q.float(), cos.float(), sin.float()).to(dtype)
        assert_close_relative(out, attention_fp64(rotated, k_cache, v_cache, 1, cache_len, tree_mask, head_dim**-0.5),
                              dtype)

        k = torch.randn(batch, steps, n_kv, head_dim, device="cuda").transpose(1, 2).to(dtype)
        v = torch.randn(batch, n_kv, steps, head_dim, device="cuda").to(dtype)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        kv_write_reference(expected_k, 1, rotate_reference(k.float(), cos.float(), sin.float()), cache_len)
        kv_write_reference(expected_v, 1, v, cache_len)
        kv_write_triton(k_cache, v_cache, 1, k, v, cache_len, cos, sin)
        torch.cuda.synchronize()
        assert torch.equal(v_cache, expected_v)
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(k_cache, expected_k, **tolerance)


def test_custom_op_runs_the_kernel_on_cuda():
    import specc.lowering  # noqa: F401  (registers the ops)
    from specc.lowering.tree_attention_triton import tree_attention_triton

    q, k_cache, v_cache, cache_len, tree_mask = random_case(9, 3, 64, 2, 16, torch.bfloat16, seed=11)
    through_op = torch.ops.specc.tree_attention(q, k_cache, v_cache, 0, cache_len, tree_mask, 0.125)
    direct = tree_attention_triton(q, k_cache, v_cache, 0, cache_len, tree_mask, 0.125)
    assert torch.equal(through_op, direct)  # the kernel is deterministic: same bits means it ran
    assert through_op.stride() == torch.empty_like(q).stride()


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_kernels_replay_in_a_cuda_graph_with_new_cache_lengths(shape):
    # The decode step is captured whole in a CUDA graph: the kernels must read cache_len on the
    # device (no host sync, fixed grid) and stay right when the buffers change between replays.
    from specc.lowering.kv_write_triton import kv_write_triton
    from specc.lowering.tree_attention_triton import tree_attention_triton

    n_heads, n_kv, head_dim = SHAPES[shape]
    batch, steps, dtype = 2, 25, torch.bfloat16
    q, k_cache, v_cache, cache_len, tree_mask = random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed=3, max_cache=2048)
    new_k = torch.randn(batch, n_kv, steps, head_dim, device="cuda").to(dtype)
    new_v = torch.randn(batch, n_kv, steps, head_dim, device="cuda").to(dtype)
    scale = head_dim**-0.5

    def step():
        kv_write_triton(k_cache, v_cache, 0, new_k, new_v, cache_len)
        return tree_attention_triton(q, k_cache, v_cache, 0, cache_len, tree_mask, scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for trial in range(3):
        gen = torch.Generator(device="cuda").manual_seed(100 + trial)
        for buffer in (q, new_k, new_v):
            buffer.copy_(torch.randn(buffer.shape, generator=gen, device="cuda").to(dtype))
        cache_len.copy_(torch.randint(0, 2049, (batch,), generator=gen, device="cuda", dtype=cache_len.dtype))
        out.fill_(float("nan"))
        k_expected, v_expected = k_cache.clone(), v_cache.clone()
        kv_write_reference(k_expected, 0, new_k, cache_len)
        kv_write_reference(v_expected, 0, new_v, cache_len)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
        assert_close_relative(out, attention_fp64(q, k_cache, v_cache, 0, cache_len, tree_mask, scale), dtype)


@pytest.mark.parametrize("steps", [1, 25, 64])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_the_folded_merge_matches_the_reference_replay_after_replay(shape, steps):
    # The tile's last program merges the split (SPECC_ATTENTION_MERGE=fold): the partials of
    # the other programs must be visible to it, and its counter back at zero for the next
    # call. Many replays of a graph of back-to-back calls, each with new cache lengths.
    from specc.lowering import tree_attention_triton as module

    n_heads, n_kv, head_dim = SHAPES[shape]
    batch, dtype = 1, torch.bfloat16
    q, k_cache, v_cache, cache_len, tree_mask = random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed=5,
                                                            max_cache=4096)
    scale = head_dim**-0.5
    outs = [torch.empty_like(q) for _ in range(4)]

    def calls():
        for out in outs:
            module.tree_attention_triton(q, k_cache, v_cache, 0, cache_len, tree_mask, scale, out=out, fold_merge=True)

    calls()  # compiles and allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    gen = torch.Generator(device="cuda").manual_seed(9)
    for trial in range(20):
        cache_len.copy_(torch.randint(0, 4097, (batch,), generator=gen, device="cuda", dtype=cache_len.dtype))
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(dtype))
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = attention_fp64(q, k_cache, v_cache, 0, cache_len, tree_mask, scale)
        for out in outs:
            assert_close_relative(out, expected, dtype)
        assert not module._COUNTERS[q.device].any(), "a counter was left non-zero"


# ----- specc::fused_linear at the draft layer's shapes --------------------------------------------
# (name, N, K, gate, norm, residual, embed): SmolLM2's draft layer (hidden 576, intermediate 1536,
# q/k/v stacked to 960, the draft vocabulary's 16,384 LM head rows) and two Llama-3-8B GEMMs
LINEAR_SHAPES = {
    "fc": (576, 1152, False, False, False, 576),
    "qkv": (960, 576, False, True, False, 0),
    "o": (576, 576, False, False, True, 0),
    "gate_up": (3072, 576, False, True, False, 0),
    "down": (576, 1536, True, False, True, 0),
    "lm_head": (16384, 576, False, True, False, 0),
    "llama3_8b_qkv": (6144, 4096, False, True, False, 0),
    "llama3_8b_down": (4096, 14336, True, False, True, 0),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 52, 130])
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES), ids=str)
def test_fused_linear_kernel_matches_fp64_reference_on_gpu(shape, rows, dtype):
    from specc.lowering.fused_linear import fused_linear_reference
    from specc.lowering.fused_linear_triton import fused_linear_triton

    n, k, gate, norm, residual, embed = LINEAR_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(rows)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    x = randn(rows, 2 * k if gate else k - embed)
    weight = randn(n, k, scale=k**-0.5)
    norm_weight = (1 + randn(k, scale=0.2)) if norm else None
    res = randn(rows, n) if residual else None
    tokens = torch.randint(0, 1000, (rows,), generator=gen, device="cuda") if embed else None
    embed_weight = randn(1000, embed) if embed else None
    got = fused_linear_triton(x, weight, norm_weight, 1e-5, gate, res, tokens, embed_weight)
    # the definition in float64, from the same (rounded) inputs
    double = [t if t is None else t.double() for t in (x, weight, norm_weight, res, embed_weight)]
    expected = fused_linear_reference(double[0], double[1], double[2], 1e-5, gate, double[3], tokens, double[4])
    whole, per_row = THRESHOLD[dtype]
    diff = got.double() - expected
    error = (diff.norm() / expected.norm()).item()
    row_error = (diff.norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-30)).max().item()
    assert not got.isnan().any()
    assert error < whole and row_error < per_row, f"relative error {error:.2e} (worst row {row_error:.2e})"


def test_fused_linear_replays_in_a_cuda_graph():
    from specc.lowering.fused_linear import fused_linear_reference
    from specc.lowering.fused_linear_triton import fused_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(52, 3072, generator=gen, device="cuda").bfloat16()
    res = torch.randn(52, 576, generator=gen, device="cuda").bfloat16()
    weight = (torch.randn(576, 1536, generator=gen, device="cuda") / 40).bfloat16()
    out = fused_linear_triton(x, weight, None, 1e-5, True, res)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_linear_triton(x, weight, None, 1e-5, True, res)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = fused_linear_reference(x.double(), weight.double(), None, 1e-5, True, res.double())
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("steps", [1, 65, 300])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_the_kernel_writing_kv_matches_kv_write_then_attention_on_gpu(shape, steps, dtype):
    # specc::kv_write_attention's launch (WRITE_KV) against the two kernels it replaces: the
    # caches it leaves (V bit for bit, K within the rotation's rounding) and its output against
    # float64 attention over those caches; then replayed in a CUDA graph with new cache lengths.
    from specc.lowering.kv_write_triton import kv_write_triton
    from specc.lowering.rotary import rotate_reference
    from specc.lowering.tree_attention_triton import tree_attention_triton

    n_heads, n_kv, head_dim = SHAPES[shape]
    batch, scale = 2, head_dim**-0.5
    q, k_cache, v_cache, cache_len, tree_mask = random_case(n_heads, n_kv, head_dim, batch, steps, dtype, seed=21,
                                                            max_cache=2000)
    cos, sin = llama_tables(batch, steps, head_dim, dtype, shared=False)
    k = torch.randn(batch, steps, n_kv, head_dim, device="cuda").transpose(1, 2).to(dtype)
    v = torch.randn(batch, n_kv, steps, head_dim, device="cuda").to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write_triton(want_k, want_v, 1, k, v, cache_len, cos, sin)
    out = torch.full_like(q, float("nan"))

    def step():
        return tree_attention_triton(q, k_cache, v_cache, 1, cache_len, tree_mask, scale, out=out,
                                     rope_cos=cos, rope_sin=sin, new_kv=(k, v), write_kv_in_launch=True)

    step()
    torch.cuda.synchronize()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert torch.equal(v_cache, want_v)
    torch.testing.assert_close(k_cache, want_k, **tolerance)
    rotated = rotate_reference(q.float(), cos.float(), sin.float()).to(dtype)
    assert_close_relative(out, attention_fp64(rotated, k_cache, v_cache, 1, cache_len, tree_mask, scale), dtype)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(2):
        gen = torch.Generator(device="cuda").manual_seed(200 + trial)
        for buffer in (q, k, v):
            buffer.copy_(torch.randn(buffer.shape, generator=gen, device="cuda").to(dtype))
        cache_len.copy_(torch.randint(0, 2001, (batch,), generator=gen, device="cuda", dtype=cache_len.dtype))
        want_k, want_v = k_cache.clone(), v_cache.clone()
        kv_write_triton(want_k, want_v, 1, k, v, cache_len, cos, sin)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(v_cache, want_v)
        torch.testing.assert_close(k_cache, want_k, **tolerance)
        assert_close_relative(out, attention_fp64(rotated.copy_(rotate_reference(q.float(), cos.float(), sin.float())),
                                                  k_cache, v_cache, 1, cache_len, tree_mask, scale), dtype)
