"""specc::topk: the reference against the ranking written out in Python and against torch.topk's
values, the op's checks and tracing, and the Triton kernels against the reference bit for bit
(interpreter on CPU, compiled on a GPU): random rows, heavy ties across chunk boundaries,
-inf, NaN and signed zeros, leading dimensions and strides."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.topk import topk_reference
from tests.lowering.interpreter import interpreted

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SENTINEL = 7777
# Few levels, so that most entries tie; -0.0 ties with 0.0.
LEVELS = (2.5, 1.0, 0.0, -0.0, -1.0, float("-inf"))
# NaN of both signs, infinities, signed zeros, subnormals of every dtype, the extremes.
SPECIALS = (float("nan"), -float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-45,
            6e-8, -6e-8, 60000.0, -60000.0, 3e38, -3e38, 1.0, -1.0, 0.5)


def make_x(shape, dtype, kind: str, seed: int) -> torch.Tensor:
    """kind: "random" (normal logits), "levels" (values from LEVELS), "neg_inf" (all -inf but
    about one entry in 40), "special" (values from SPECIALS, NaN included)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return (3.0 * torch.randn(shape, generator=generator)).to(dtype)
    if kind == "neg_inf":
        x = torch.randn(shape, generator=generator)
        return x.masked_fill(torch.rand(shape, generator=generator) > 1 / 40, float("-inf")).to(dtype)
    pool = {"levels": LEVELS, "special": SPECIALS}[kind]
    return torch.tensor(pool)[torch.randint(len(pool), shape, generator=generator)].to(dtype)


def topk_by_definition(x: torch.Tensor, k: int) -> torch.Tensor:
    """The op's indices, one row at a time in plain Python: NaN first, then value descending
    (-0.0 == 0.0), then index ascending."""
    rows = x.reshape(-1, x.shape[-1]).float().tolist()  # exact for every dtype here
    out = []
    for row in rows:
        def rank(i, row=row):
            return (0, 0.0, i) if math.isnan(row[i]) else (1, -row[i], i)
        out.append(sorted(range(len(row)), key=rank)[:k])
    return torch.tensor(out, dtype=torch.long).reshape(*x.shape[:-1], k)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got.view(INT_VIEW[got.dtype]), want.view(INT_VIEW[want.dtype])), f"{what}\ngot  {got}\nwant {want}"


@st.composite
def cases(draw) -> dict:
    n_cols = draw(st.integers(1, 80))
    return dict(
        lead=draw(st.sampled_from([(), (3,), (2, 2)])),
        n_cols=n_cols,
        k=draw(st.integers(1, min(n_cols, 64))),
        dtype=draw(st.sampled_from(DTYPES)),
        kind=draw(st.sampled_from(["random", "levels", "neg_inf", "special"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_reference_is_the_ranking_definition(case):
    x = make_x((*case["lead"], case["n_cols"]), case["dtype"], case["kind"], case["seed"])
    values, indices = topk_reference(x, case["k"])
    want = topk_by_definition(x, case["k"])
    assert indices.dtype == torch.long and torch.equal(indices, want), (case, indices, want)
    assert_same_bits(values, x.gather(-1, want), str(case))


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_reference_values_equal_torch_topk_values(case):
    # The tie rule only reorders (and, at the k-th value, chooses among) equal values.
    x = make_x((*case["lead"], case["n_cols"]), case["dtype"], case["kind"], case["seed"])
    values, _ = topk_reference(x, case["k"])
    torch_values, _ = torch.topk(x, case["k"], dim=-1, largest=True, sorted=True)
    torch.testing.assert_close(values, torch_values, rtol=0, atol=0, equal_nan=True)


def test_equal_values_come_lowest_index_first():
    x = torch.tensor([[0.0, 3.0, -0.0, 3.0, float("-inf"), 3.0, float("-inf")]])
    values, indices = torch.ops.specc.topk(x, 6)
    assert indices.tolist() == [[1, 3, 5, 0, 2, 4]]
    assert values[0, 4].item() == 0.0 and values[0, 4].signbit(), "values are x's entries, -0.0 kept"
    # fewer than k entries above -inf: the lowest-index -inf ones fill the rest
    assert torch.ops.specc.topk(torch.full((2, 5), float("-inf")), 3)[1].tolist() == [[0, 1, 2]] * 2
    # NaN ranks above +inf
    nan_first = torch.tensor([1.0, float("inf"), float("nan"), 2.0, float("nan")])
    assert torch.ops.specc.topk(nan_first, 3)[1].tolist() == [2, 4, 1]


def test_op_rejects_bad_k_and_inputs():
    x = torch.zeros(2, 100)
    for k in (0, -1, 65):
        with pytest.raises(ValueError, match=f"got k={k} for V=100"):
            torch.ops.specc.topk(x, k)
    with pytest.raises(ValueError, match="got k=6 for V=5"):
        torch.ops.specc.topk(torch.zeros(3, 5), 6)
    with pytest.raises(ValueError, match="got k=1 for V=0"):
        torch.ops.specc.topk(torch.zeros(3, 0), 1)
    with pytest.raises(ValueError, match="0-dim"):
        torch.ops.specc.topk(torch.tensor(1.0), 1)
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(ValueError, match=str(dtype)):
            torch.ops.specc.topk(x.to(dtype), 4)
    assert torch.ops.specc.topk(torch.zeros(3, 5), 5)[1].shape == (3, 5)


def test_op_passes_opcheck():
    for shape, dtype, k in (((2, 3, 50), torch.bfloat16, 7), ((4, 64), torch.float32, 64), ((9,), torch.float16, 1)):
        x = make_x(shape, dtype, "levels", seed=k)
        torch.library.opcheck(torch.ops.specc.topk.default, (x, k))


@pytest.mark.parametrize("dynamic", [False, True])
def test_op_under_torch_compile_matches_torch_topk_values(dynamic):
    def step(logits, k: int):
        values, indices = torch.ops.specc.topk(logits.float().log_softmax(-1), k)
        return values, indices, logits.gather(-1, indices)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape, k in (((2, 3, 1000), 8), ((1, 5, 777), 64)):
        logits = make_x(shape, torch.bfloat16, "random", seed=k)
        values, indices, gathered = compiled(logits, k)
        want = torch.topk(logits.float().log_softmax(-1), k, dim=-1)
        assert values.shape == indices.shape == (*shape[:-1], k) and indices.dtype == torch.long
        torch.testing.assert_close(values, want.values, rtol=0, atol=0)
        assert torch.equal(indices, topk_by_definition(logits.float().log_softmax(-1), k))
        assert torch.equal(gathered, logits.gather(-1, indices))


def test_kernel_checks_its_output_buffers():
    from specc.lowering.topk_triton import topk_triton

    x = torch.zeros(2, 30)
    with pytest.raises(ValueError, match=r"values must be contiguous torch.float32 \[2, 4\]"):
        topk_triton(x, 4, out=(torch.empty(2, 5), torch.empty(2, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="indices must be contiguous torch.int64"):
        topk_triton(x, 4, out=(torch.empty(2, 4), torch.empty(4, 2, dtype=torch.long).t()))


# ------------------------------------------------------------------------------ the kernels


def check_kernel_against_reference(x: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """Assert the kernels' output equals the reference's, bit for bit; return the indices."""
    from specc.lowering.topk_triton import topk_triton

    shape = (*x.shape[:-1], k)
    # Poisoned outputs: an entry the kernel forgets to write keeps the sentinel and fails.
    out = (torch.full(shape, SENTINEL, dtype=x.dtype, device=x.device),
           torch.full(shape, SENTINEL, dtype=torch.long, device=x.device))
    values, indices = topk_triton(x, k, chunk=chunk, out=out)
    want_values, want_indices = topk_reference(x, k)
    what = f"{x.dtype} {list(x.shape)} k={k} chunk={chunk}"
    assert torch.equal(indices, want_indices), f"{what}\nkernel    {indices.tolist()}\nreference {want_indices.tolist()}"
    assert_same_bits(values, want_values, what)
    return indices


# The interpreter's cost is about 1 ms per program and selection step, whatever the chunk's
# length: the cases keep rows x chunks x k small and make long chunks rather than many.


@interpreted
def test_kernel_equals_reference_on_random_rows_in_interpreter():
    # (V, k, chunk): one row shorter than a chunk, a row of one entry, rows of several chunks
    # with the last one partial, chunks shorter than k (their spare candidates are EMPTY), and
    # the default chunk with a partial second chunk.
    shapes = ((1, 1, None), (5, 5, None), (100, 1, None), (100, 13, None), (100, 64, None),
              (300, 1, 64), (300, 7, 64), (700, 64, 256), (100, 20, 16), (1000, 33, 256), (5000, 8, None))
    for dtype in DTYPES:
        for n_cols, k, chunk in shapes:
            for kind in ("random", "levels"):
                check_kernel_against_reference(make_x((2, n_cols), dtype, kind, seed=n_cols + k), k, chunk)


@interpreted
def test_kernel_equals_reference_at_vocab_width_in_interpreter():
    # SmolLM2's V = 49152 = 12 default chunks. bf16 logits of 49152 entries tie often.
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x((2, 49152), dtype, "random", seed=1)
        for k in (1, 8, 64):
            check_kernel_against_reference(x, k)
    ties = make_x((1, 49152), torch.bfloat16, "levels", seed=2)
    check_kernel_against_reference(ties, 64)
    assert int((ties == 2.5).sum()) > 64  # so the 64 returned are all ties, across chunks


@interpreted
def test_kernel_orders_ties_by_lower_index_in_interpreter():
    # Ties within and across chunks (chunk 64 over 700 entries); the kernel's indices are the
    # definition's, not only the reference's.
    from specc.lowering.topk_triton import topk_triton

    for dtype in DTYPES:
        x = make_x((2, 700), dtype, "levels", seed=3)
        for k in (1, 5, 64):
            assert torch.equal(check_kernel_against_reference(x, k, chunk=64), topk_by_definition(x, k))
    # One level in the whole row: the answer is 0..k-1 however many chunks there are.
    for chunk in (16, 64, None):
        assert topk_triton(torch.full((2, 300), -2.0), 20, chunk=chunk)[1].tolist() == [list(range(20))] * 2


@interpreted
def test_kernel_selects_neg_inf_nan_and_signed_zeros_like_reference_in_interpreter():
    from specc.lowering.topk_triton import topk_triton

    for dtype in DTYPES:
        for n_cols, k, chunk in ((50, 10, None), (50, 45, 16), (300, 20, 32), (1000, 64, 256)):
            for kind in ("neg_inf", "special"):
                x = make_x((2, n_cols), dtype, kind, seed=n_cols)
                assert torch.equal(check_kernel_against_reference(x, k, chunk), topk_by_definition(x, k))
        # every entry -inf; and 3 finite entries, in the last chunk, then the first -inf ones
        x = torch.full((2, 200), float("-inf"), dtype=dtype)
        check_kernel_against_reference(x, 64, chunk=64)
        x[:, [197, 60, 199]] = torch.tensor([1.0, -3.0, -1.0], dtype=dtype)
        check_kernel_against_reference(x, 10, chunk=32)
        assert topk_triton(x, 5, chunk=32)[1].tolist() == [[197, 199, 60, 0, 1]] * 2


@interpreted
def test_kernel_takes_any_leading_dims_and_strides_in_interpreter():
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x((2, 3, 300), dtype, "levels", seed=4)  # [B, R, V]
        check_kernel_against_reference(x, 9, chunk=64)
        check_kernel_against_reference(x[1, 2], 9, chunk=64)  # 1-D
        check_kernel_against_reference(x.reshape(6, 300), 9, chunk=64)  # 2-D
        check_kernel_against_reference(x.reshape(2, 3, 2, 150), 9, chunk=64)  # 4-D
        check_kernel_against_reference(x[:, ::2], 9, chunk=64)  # leading dims that do not merge
        check_kernel_against_reference(x[..., 7:250], 9, chunk=64)  # rows start past their storage row
        narrow = make_x((2, 4, 24), dtype, "levels", seed=5)
        check_kernel_against_reference(narrow.transpose(1, 2), 3)  # last-dim stride 24
        check_kernel_against_reference(narrow.transpose(1, 2)[:, 5:], 4)
        check_kernel_against_reference(x[:0], 9)  # no rows: nothing to launch
        check_kernel_against_reference(x[:, :0], 9)


@interpreted
def test_kernel_source_is_deterministic_and_dumped_in_interpreter():
    from specc.lowering.codegen import all_generated_sources
    from specc.lowering.topk_triton import default_chunk, generated_sources, kernel_source, narrow_keys

    assert default_chunk(16384, 12) == 512 and default_chunk(49152, 1) == 1024  # the draft's top-k, an argmax
    assert default_chunk(100, 5) == 128 and default_chunk(3, 1) == 16
    # the kernel run below: the default chunk and key width
    params = dict(n_cols=49152, k=8, dtype=torch.bfloat16, chunk=512, narrow=narrow_keys(49152, torch.bfloat16))
    source = kernel_source(**params)
    assert kernel_source.__wrapped__(**params) == source
    for line in ("N_COLS = tl.constexpr(49152)", "K = tl.constexpr(8)", "N_CHUNKS = tl.constexpr(96)",
                 "N_CAND = tl.constexpr(768)", "BLOCK_CAND = tl.constexpr(1024)", "INF_BITS = tl.constexpr(0x7f80)"):
        assert line in source, line
    widths = {
        True: ("KEY_SHIFT = tl.constexpr(16)", "INDEX_BASE = tl.constexpr(65535)", "EMPTY = tl.constexpr(-2147483648)"),
        False: ("KEY_SHIFT = tl.constexpr(32)", "INDEX_BASE = tl.constexpr(2147483647)",
                "EMPTY = tl.constexpr(-9223372036854775808)"),
    }
    for narrow, lines in widths.items():
        for line in lines:
            assert line in kernel_source(**dict(params, narrow=narrow)), (narrow, line)
    assert kernel_source(**dict(params, dtype=torch.float16)) != source
    check_kernel_against_reference(make_x((1, 49152), torch.bfloat16, "random", seed=5), 8)
    assert source in generated_sources().values()
    assert source in all_generated_sources().values()
    for bad in (dict(params, chunk=100), dict(params, k=0), dict(params, dtype=torch.float64),
                dict(params, dtype=torch.float32, narrow=True), dict(params, n_cols=65537, narrow=True)):
        with pytest.raises(ValueError):
            kernel_source(**bad)


@interpreted
def test_narrow_and_wide_keys_select_alike_in_interpreter():
    # int32 keys (16-bit x, V <= 2^16) against int64 keys: the same indices and value bits,
    # with ties across chunks, -inf rows, NaN and signed zeros, and V = 2^16 (the widest
    # narrow row: column 65535's low word is 0). Rows past 2^16 and fp32 keep int64 keys.
    from specc.lowering import topk_triton as module

    def select(x, k, chunk, narrow: bool):
        saved, module.NARROW_KEYS = module.NARROW_KEYS, narrow
        try:
            assert module.narrow_keys(x.shape[-1], x.dtype) == narrow
            return check_kernel_against_reference(x, k, chunk)
        finally:
            module.NARROW_KEYS = saved

    saved, module.NARROW_KEYS = module.NARROW_KEYS, True
    try:
        assert module.narrow_keys(65536, torch.bfloat16) and module.narrow_keys(16384, torch.float16)
        assert not module.narrow_keys(65537, torch.bfloat16) and not module.narrow_keys(100, torch.float32)
    finally:
        module.NARROW_KEYS = saved
    cases = [((2, 300), 7, 64), ((1, 1000), 20, 256), ((1, 65536), 5, None)]
    for dtype in (torch.bfloat16, torch.float16):
        for shape, k, chunk in cases:
            for kind in ("random", "levels", "neg_inf", "special"):
                x = make_x(shape, dtype, kind, seed=k + shape[-1])
                if shape[-1] == 65536:
                    x[..., -1] = float("inf")  # the last column must win: its key's low word is 0
                narrow, wide = select(x, k, chunk, True), select(x, k, chunk, False)
                assert torch.equal(narrow, wide), (dtype, shape, k, kind)
                if shape[-1] == 65536 and kind != "special":
                    assert int(narrow.reshape(-1)[0]) == 65535


@pytest.mark.gpu
@pytest.mark.parametrize("narrow", [False, True])
def test_kernel_equals_reference_on_gpu(narrow, monkeypatch):
    from specc.lowering import topk_triton as module
    from specc.lowering.topk_triton import topk_triton

    monkeypatch.setattr(module, "NARROW_KEYS", narrow)  # int32 keys where they apply (16-bit, V <= 2^16)
    for dtype in DTYPES:
        for shape, k in (((1, 64, 49152), 8), ((4, 64, 49152), 64), ((3, 8, 49152), 1), ((2, 7, 128256), 10),
                         ((5, 1000), 64), ((2, 3), 3)):
            for kind in ("random", "levels", "neg_inf", "special"):
                x = make_x(shape, dtype, kind, seed=k).cuda()
                values, indices = topk_triton(x, k)
                want_values, want_indices = topk_reference(x.cpu(), k)
                assert torch.equal(indices.cpu(), want_indices), (dtype, shape, k, kind)
                assert_same_bits(values.cpu(), want_values, f"{dtype} {shape} k={k} {kind}")
                # and through the op, which dispatches CUDA tensors to the kernel
                assert torch.equal(torch.ops.specc.topk(x, k)[1].cpu(), want_indices)


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    x = make_x((2, 64, 49152), torch.bfloat16, "random", seed=6).cuda()
    torch.ops.specc.topk(x, 8)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = torch.ops.specc.topk(x, 8)
    for seed in (7, 8):
        x.copy_(make_x(x.shape, torch.bfloat16, "levels" if seed == 8 else "random", seed=seed).cuda())
        graph.replay()
        want_values, want_indices = topk_reference(x.cpu(), 8)
        assert torch.equal(indices.cpu(), want_indices)
        assert_same_bits(values.cpu(), want_values, f"replay {seed}")
