"""The attention kernel compiles for an H100 (sm_90) in every launch specc makes at SmolLM2's and
Llama-3-8B's shapes, within Hopper's shared memory, on a machine without a GPU.

Triton's interpreter, which runs the other kernel tests on the CPU, accepted two forms of the
K/V-writing kernel that then failed on the GPU's first call (a loop variable reassigned with
another shape; 304,128 bytes of shared memory at D = 128 in fp32: results/2026-12-06c_h100).
Triton compiles for a named target without a driver (lowering/codegen.py: compile_for_gpu), so
this catches both here. Registers and spills are only known to a driver, so not checked.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from specc.lowering.codegen import DTYPE_NAMES, compile_for_gpu  # noqa: E402
from specc.lowering.tree_attention_triton import (  # noqa: E402
    _choose_blocks, _decode_blocks, compile_without_gpu, kernel_source, write_kv_stages)

HOPPER_SHARED_BYTES = 232_448  # the most a block may take, as the H100 itself reported it (call 12)
SHAPES = {"smollm2": (9, 3, 64), "llama3_8b": (32, 8, 128)}  # (Hq, Hkv, D)


@functools.cache
def _cannot_compile() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "this process interprets Triton kernels; the compile test needs the compiler"
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(x_ptr):
            tl.store(x_ptr, 1.0)

        compile_for_gpu(probe, {"x_ptr": "*fp32"}, num_warps=1, num_stages=1)
    except Exception as error:  # noqa: BLE001  (any failure: no offline compiler here)
        return f"Triton cannot compile for sm_90 here ({type(error).__name__}: {str(error)[:200]})"
    return None


def launches() -> list[tuple]:
    """(label, kernel_source kwargs, num_warps, num_stages) of the launches tree_attention_triton
    makes: split decode (T = 1) and verify (T = 65) steps, one-pass prefill (T = 300), bf16 and
    fp32, with and without WRITE_KV; duplicates dropped."""
    seen, cases = set(), []
    for shape, (n_heads, n_kv, head_dim) in SHAPES.items():
        group = n_heads // n_kv
        for dtype in (torch.bfloat16, torch.float32):
            for steps, split in ((1, True), (65, True), (300, False)):
                rows = steps * group
                blocks = _decode_blocks(rows, head_dim) if split and dtype != torch.float32 else \
                    _choose_blocks(rows, head_dim, dtype)
                block_m, block_n, warps, stages = blocks
                for write_kv in (False, True):
                    params = dict(head_dim=head_dim, gqa_group=group, dtype=DTYPE_NAMES[dtype], block_m=block_m,
                                  block_n=block_n, split_kv=split, rope=True, write_kv=write_kv)
                    launch_stages = write_kv_stages(stages, head_dim) if write_kv else stages
                    key = (tuple(sorted(params.items())), warps, launch_stages)
                    if key not in seen:
                        seen.add(key)
                        label = f"{shape}-{DTYPE_NAMES[dtype]}-T{steps}-{'write_kv' if write_kv else 'attend'}"
                        cases.append(pytest.param(params, warps, launch_stages, id=label))
    return cases


@pytest.mark.parametrize(("params", "warps", "stages"), launches())
def test_the_attention_kernel_compiles_for_sm90_within_shared_memory(params, warps, stages):
    reason = _cannot_compile()
    if reason:
        pytest.skip(reason)
    compiled = compile_without_gpu(kernel_source(**params), params["dtype"], num_warps=warps, num_stages=stages)
    assert 0 < compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{compiled.metadata.shared:,} bytes of shared memory"
