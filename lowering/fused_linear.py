"""specc::fused_linear — a linear layer with the Llama block's pointwise neighbours folded in.

    a = x                                              x [..., K], or [..., 2K] with gate
    a = cat(embed_weight[tokens], a)                   tokens [...] given: the EAGLE input
    a = silu(a[..., :K]) * a[..., K:]                  gate: the SwiGLU of Llama's MLP
    a = rms_norm(a, norm_weight, eps)                  norm_weight [K] given: Llama's RMSNorm
    y = a @ weight.T                                   weight [N, K]
    y = residual + y                                   residual [..., N] given

each step in x's dtype, rounded as the model rounds it (specc.models.llama: the norm in fp32,
cast back, then scaled; silu and the product in x's dtype). One dtype for x, weight,
norm_weight, embed_weight [V, E] and residual (fp32, bf16 or fp16); tokens are integers in
[0, V) (the kernel reads row 0 for one outside, the reference raises); with them, x has
K - E columns. The gate and the embedding do not combine. The output is contiguous [..., N].

Why an op: the EAGLE draft layer runs on a few dozen rows (one per tree node), where each of
its GEMMs costs its launch, not its bytes, and each RMSNorm, SwiGLU and residual add is a
kernel of its own between two GEMMs (Inductor cannot fuse them into cuBLAS). With this op a
draft layer is four GEMM launches and no pointwise kernels between them: the kernel
(fused_linear_triton.py) normalises or gates its input tile as it loads it (every program
reads all K columns of its rows anyway) and adds the residual before it stores.

Measured slower, so the draft does not use it by default (SPECC_FUSE_DRAFT_LINEAR=1 turns it
on; results/2026-12-03d_h200, H200, bf16): the draft fell from 107 to 80 kernels a step, but
its 36 fused GEMMs took 407 µs where cuBLAS and Inductor's kernels took about 200, and the
`tuned:64,6` step rose from 1.348 to 1.596 ms. The kernel is a plain tiled GEMM: it splits N
only, so N = 576 gives 36 programs that each walk all of K (cuBLAS splits K as well), and its
SwiGLU prologue makes the down projection 23-48 µs, against 6-14 µs for the same GEMM without
the gate and 4.6 µs for cuBLAS. A likely reason, from the PTX (sm_90, compiled offline, not
timed): each of the 36 column programs recomputes the gate for all of its rows and all of K.
With 52 rows in a 64-row tile, that is 768 sigmoids per thread, each with an IEEE fp32 division
(tl.sigmoid's). That is 36 times the work of gating once. The o projection with the residual
add (2.6-3.1 µs against cuBLAS's 3.0 plus the add) is the one case it wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specc.lowering.codegen import DTYPE_NAMES
from specc.lowering.registry import kernel_enabled
from specc.models.llama import rms_norm

DTYPES = tuple(DTYPE_NAMES)  # the kernels' dtypes


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                           gate: bool, residual: torch.Tensor | None, tokens: torch.Tensor | None = None,
                           embed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: the model's own functions, in the order of the module docstring."""
    a = x
    if tokens is not None:
        a = torch.cat([F.embedding(tokens, embed_weight), a], dim=-1)
    if gate:
        g, u = a.chunk(2, dim=-1)
        a = F.silu(g) * u
    if norm_weight is not None:
        a = rms_norm(a, norm_weight, eps)
    y = F.linear(a, weight)
    return y if residual is None else residual + y


def check_fused_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
                       gate: bool, residual: torch.Tensor | None, tokens: torch.Tensor | None = None,
                       embed_weight: torch.Tensor | None = None) -> None:
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"fused_linear needs x [..., K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    embed = 0
    if (tokens is None) != (embed_weight is None):
        raise ValueError("fused_linear: give both tokens and embed_weight, or neither")
    if tokens is not None:
        if gate:
            raise ValueError("fused_linear: the gate and the token embedding do not combine; run them as two calls")
        if embed_weight.dim() != 2 or tokens.shape != x.shape[:-1] or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"fused_linear: tokens must be int32/int64 {list(x.shape[:-1])} and embed_weight [V, E]; "
                             f"got {tokens.dtype} {tuple(tokens.shape)} and {tuple(embed_weight.shape)}")
        if tokens.device != x.device:
            raise ValueError(f"fused_linear: tokens are on {tokens.device} but x is on {x.device}")
        embed = embed_weight.shape[1]
    width = 2 * k if gate else k - embed
    if x.shape[-1] != width:
        what = (f"2 * K = {width} columns (gate and up)" if gate
                else f"K - E = {k} - {embed} = {width} columns" if embed else f"K = {k} columns")
        raise ValueError(f"fused_linear: weight {tuple(weight.shape)} needs x with {what}; got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"fused_linear takes fp32, bf16 or fp16; got x of {x.dtype}")
    named = [("weight", weight, (n, k))]
    if embed_weight is not None:
        named.append(("embed_weight", embed_weight, tuple(embed_weight.shape)))
    if norm_weight is not None:
        named.append(("norm_weight", norm_weight, (k,)))
    if residual is not None:
        named.append(("residual", residual, (*x.shape[:-1], n)))
    for name, t, shape in named:
        if tuple(t.shape) != shape:
            raise ValueError(f"fused_linear: {name} must be {list(shape)} for x {tuple(x.shape)}; got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"fused_linear: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                             f"cast them to one dtype and device")


@torch.library.custom_op("specc::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, gate: bool = False, residual: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None, embed_weight: torch.Tensor | None = None) -> torch.Tensor:
    check_fused_linear(x, weight, norm_weight, gate, residual, tokens, embed_weight)
    if x.is_cuda and kernel_enabled():
        from specc.lowering.fused_linear_triton import fused_linear_triton

        return fused_linear_triton(x, weight, norm_weight, eps, gate, residual, tokens, embed_weight)
    return fused_linear_reference(x, weight, norm_weight, eps, gate, residual, tokens, embed_weight).contiguous()


@fused_linear.register_fake
def _(x, weight, norm_weight=None, eps=1e-5, gate=False, residual=None, tokens=None, embed_weight=None):
    check_fused_linear(x, weight, norm_weight, gate, residual, tokens, embed_weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
