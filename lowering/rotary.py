"""Rotary position embedding as an input of specc::kv_write and specc::tree_attention.

Both ops take optional `rope_cos`, `rope_sin` [B or 1, T, D]. Given them, the op's k (kv_write)
or q (tree_attention) is the projection *before* rotation, and the op rotates it first:

    x' = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

which is the Llama rotation (specc.models.llama, HF's apply_rotary_pos_emb) with cos/sin
broadcast over heads. The kernels rotate as they load, so the rotated q and k are never
written to memory: a Llama layer loses two of its elementwise kernels (passes/rotary_fusion.py).
"""

from __future__ import annotations

import torch

from specc.models.llama import rotate_half


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by cos, sin [B or 1, T, D]: the model's own formula, in its dtypes."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def check_rotary(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, what: str) -> None:
    """Both or neither of cos/sin, each [B or 1, T, D] for x [B, H, T, D] on x's device, D even."""
    if cos is None and sin is None:
        return
    if cos is None or sin is None:
        raise ValueError(f"{what}: give both rope_cos and rope_sin, or neither (got only one)")
    if x.dim() != 4:
        raise ValueError(f"{what}: the tensor to rotate must be [B, H, T, D]; got {tuple(x.shape)}")
    batch, _, steps, head_dim = x.shape
    for name, table in (("rope_cos", cos), ("rope_sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, batch) or tuple(table.shape[1:]) != (steps, head_dim):
            raise ValueError(f"{what}: {name} must be [{batch} or 1, {steps}, {head_dim}] for {tuple(x.shape)}; "
                             f"got {tuple(table.shape)}")
        if not table.is_floating_point() or table.device != x.device:
            raise ValueError(f"{what}: {name} must be a floating tensor on {x.device}; got {table.dtype} on {table.device}")
    if head_dim % 2:
        raise ValueError(f"{what}: rotary embedding needs an even head dim; got {head_dim}")


def kernel_tables(cos: torch.Tensor | None, sin: torch.Tensor | None,
                  unused: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
    """The kernels' table arguments: ((cos, sin), (batch stride, token stride)).

    Both tables get one set of strides with the last dimension contiguous (the tables Inductor
    hands over already have it; anything else is copied); the batch stride is 0 when one row
    serves every sequence. Without tables (None): `unused` twice and zero strides, which a
    kernel compiled without ROPE never reads."""
    if cos is None:
        return (unused, unused), (0, 0)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return (cos, sin), (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1))
