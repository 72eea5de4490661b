"""lowering/fused_linear.py: the reference is the model's own norm / SwiGLU / linear / add, the op
refuses arguments that do not fit before any kernel runs, and the generated kernel
(fused_linear_triton.py) equals the reference under Triton's interpreter (fp32 and fp16; the
interpreter has no bf16: tests/lowering/test_kernels_gpu.py checks bf16 on the GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.fused_linear import fused_linear_reference
from specc.models.llama import MLP, LlamaConfig, RMSNorm
from tests.lowering.interpreter import interpreted

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def test_the_reference_is_the_models_norm_then_linear_and_its_mlp():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=12)
    norm, mlp = RMSNorm(24, 1e-5), MLP(config)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x, residual = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    weight = torch.randn(16, 24)
    with torch.no_grad():
        assert torch.equal(fused_linear_reference(x, weight, norm.weight, 1e-5, False, None), F.linear(norm(x), weight))
        # one GEMM for gate and up against two: equal up to the GEMMs' summation order
        gate_up = F.linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        torch.testing.assert_close(fused_linear_reference(gate_up, mlp.down_proj.weight, None, 0.0, True, residual),
                                   residual + mlp(x), rtol=1e-6, atol=1e-6)


def test_the_op_on_the_cpu_is_the_reference():
    torch.manual_seed(1)
    x, weight, norm_weight = torch.randn(2, 4, 16), torch.randn(8, 16), torch.randn(16)
    residual = torch.randn(2, 4, 8)
    out = torch.ops.specc.fused_linear(x, weight, norm_weight, 1e-6, False, residual)
    assert out.is_contiguous() and torch.equal(out, fused_linear_reference(x, weight, norm_weight, 1e-6, False, residual))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(3, 10)), r"needs x with K = 16 columns; got \(3, 10\)"),
        (dict(gate=True), r"needs x with 2 \* K = 32 columns \(gate and up\)"),
        (dict(weight=torch.zeros(8)), r"needs x \[..., K\] and weight \[N, K\]"),
        (dict(norm_weight=torch.zeros(15)), r"norm_weight must be \[16\]"),
        (dict(residual=torch.zeros(3, 9)), r"residual must be \[3, 8\]"),
        (dict(weight=torch.zeros(8, 16, dtype=torch.float64)), r"weight is torch.float64 on cpu but x is torch.float32"),
        (dict(x=torch.zeros(3, 16, dtype=torch.int64), weight=torch.zeros(8, 16, dtype=torch.int64)),
         "takes fp32, bf16 or fp16"),
        (dict(tokens=torch.zeros(3, dtype=torch.int64)), "give both tokens and embed_weight, or neither"),
        (dict(x=torch.zeros(3, 10), tokens=torch.zeros(3, dtype=torch.int64), embed_weight=torch.zeros(5, 4)),
         r"needs x with K - E = 16 - 4 = 12 columns"),
        (dict(x=torch.zeros(3, 12), tokens=torch.zeros(2, dtype=torch.int64), embed_weight=torch.zeros(5, 4)),
         r"tokens must be int32/int64 \[3\]"),
        (dict(x=torch.zeros(3, 28), gate=True, tokens=torch.zeros(3, dtype=torch.int64), embed_weight=torch.zeros(5, 4)),
         "the gate and the token embedding do not combine"),
    ],
)
def test_the_op_refuses_arguments_that_do_not_fit(change, message):
    args = dict(x=torch.zeros(3, 16), weight=torch.zeros(8, 16), norm_weight=None, eps=1e-5, gate=False, residual=None,
                tokens=None, embed_weight=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.specc.fused_linear(**args)


@st.composite
def linear_cases(draw):
    gate = draw(st.booleans())
    return dict(
        embed=0 if gate else draw(st.sampled_from([0, 0, 8, 20])),  # EAGLE's input: embedding columns first
        rows=draw(st.integers(1, 70)),  # past 64 rows: two row tiles
        n=draw(st.integers(1, 80)),
        k=draw(st.integers(1, 72)),  # odd widths: masked column and K tails
        gate=gate,
        norm=draw(st.booleans()),
        residual=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        strided=draw(st.booleans()),  # x as every other row of a larger tensor
        blocks=draw(st.sampled_from([None, (16, 16, 16, 4, 1), (32, 32, 32, 4, 2)])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@interpreted
@settings(max_examples=60, deadline=None)
@given(case=linear_cases())
def test_fused_linear_kernel_equals_reference(case):
    from specc.lowering.fused_linear_triton import fused_linear_triton

    gen = torch.Generator().manual_seed(case["seed"])
    dtype, rows, n, k = case["dtype"], case["rows"], case["n"], case["k"]
    embed = case["embed"]
    width = 2 * k if case["gate"] else k
    x = torch.randn(2 * rows if case["strided"] else rows, width, generator=gen)
    x = (x[::2] if case["strided"] else x).to(dtype)
    tokens = embed_weight = None
    if embed:
        tokens = torch.randint(0, 13, (rows,), generator=gen)
        embed_weight = torch.randn(13, embed, generator=gen).to(dtype)
    weight = (torch.randn(n, k + embed, generator=gen) / k**0.5).to(dtype)
    norm_weight = (1 + 0.3 * torch.randn(k + embed, generator=gen)).to(dtype) if case["norm"] else None
    residual = torch.randn(rows, n, generator=gen).to(dtype) if case["residual"] else None
    got = fused_linear_triton(x, weight, norm_weight, 1e-5, case["gate"], residual, tokens, embed_weight,
                              blocks=case["blocks"])
    want = fused_linear_reference(x, weight, norm_weight, 1e-5, case["gate"], residual, tokens, embed_weight)
    assert got.shape == (rows, n) and got.dtype == dtype and got.is_contiguous()
    # fp32: sums in another order; fp16: the same roundings at the same places, so the rare
    # difference is one rounding step of an output
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)


@interpreted
def test_the_kernel_keeps_leading_dimensions_and_reads_every_prologue_input():
    # A wrong norm weight, a dropped residual or an ungated input each move the output by far
    # more than the tolerance.
    from specc.lowering.fused_linear_triton import fused_linear_triton

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 48, generator=gen)
    weight = torch.randn(20, 24, generator=gen)
    norm_weight = 1 + torch.rand(24, generator=gen)
    residual = torch.randn(2, 3, 20, generator=gen)
    got = fused_linear_triton(x, weight, norm_weight, 1e-5, True, residual)
    assert got.shape == (2, 3, 20)
    torch.testing.assert_close(got, fused_linear_reference(x, weight, norm_weight, 1e-5, True, residual),
                               rtol=1e-5, atol=1e-5)
    for wrong in (fused_linear_reference(x, weight, torch.ones(24), 1e-5, True, residual),
                  fused_linear_reference(x, weight, norm_weight, 1e-5, True, None)):
        assert (got - wrong).abs().max() > 0.1


@interpreted
def test_the_kernel_reads_strided_tokens_at_their_places():
    # tokens as every other entry of a longer tensor: the kernel must not read them as contiguous
    from specc.lowering.fused_linear_triton import fused_linear_triton

    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 11, (10,), generator=gen)[::2]
    x, embed_weight = torch.randn(5, 12, generator=gen), torch.randn(11, 20, generator=gen)
    weight = torch.randn(16, 32, generator=gen)
    got = fused_linear_triton(x, weight, None, 1e-5, False, None, tokens, embed_weight)
    torch.testing.assert_close(got, fused_linear_reference(x, weight, None, 1e-5, False, None, tokens, embed_weight),
                               rtol=1e-5, atol=1e-5)


def test_the_kernel_source_is_deterministic_and_refuses_bad_tiles():
    from specc.lowering.fused_linear_triton import kernel_source

    params = dict(n=960, k=576, dtype=torch.bfloat16, gate=False, norm=True, residual=False,
                  block_m=16, block_n=16, block_k=128)
    assert kernel_source(**params) == kernel_source(**params)
    source = kernel_source(**params)
    for line in ("N = tl.constexpr(960)", "K = tl.constexpr(576)", "NORM = tl.constexpr(True)",
                 "GATE = tl.constexpr(False)", "BLOCK_K = tl.constexpr(128)"):
        assert line in source
    with pytest.raises(ValueError, match="block_n=24 must be a power of two >= 16"):
        kernel_source(**{**params, "block_n": 24})


def test_blocks_override_is_read_and_checked(monkeypatch):
    from specc.lowering.fused_linear_triton import default_blocks

    assert default_blocks(7, 960, 576)[:3] == (16, 16, 128)
    assert default_blocks(52, 16384, 576)[:3] == (64, 64, 128)
    monkeypatch.setenv("SPECC_FUSED_LINEAR_BLOCKS", "32,32,64,8,2")
    assert default_blocks(7, 960, 576) == (32, 32, 64, 8, 2)
    monkeypatch.setenv("SPECC_FUSED_LINEAR_BLOCKS", "32,32")
    with pytest.raises(ValueError, match="give five integers"):
        default_blocks(7, 960, 576)
