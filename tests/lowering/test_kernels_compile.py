"""The attention kernel compiles for an H100 (sm_90) in every launch specc makes at SmolLM2's and
Llama-3-8B's shapes, within Hopper's shared memory, on a machine without a GPU; so do the top-k
kernels at the step's shapes with either key width.

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


@pytest.mark.parametrize("narrow", [False, True], ids=["int64-keys", "int32-keys"])
@pytest.mark.parametrize(("n_cols", "k"), [(16384, 12), (16384, 4), (49152, 1)], ids=["draft-k12", "draft-k4", "argmax"])
def test_the_topk_kernels_compile_for_sm90_with_either_key_width(n_cols, k, narrow):
    # the draft's top-k over its 16,384-token vocabulary and the verifier's argmax over SmolLM2's
    # 49,152 tokens, bf16, at the default chunk and warps; int32 keys (topk_triton.NARROW_KEYS)
    # should make each selection step one warp reduction instruction
    reason = _cannot_compile()
    if reason:
        pytest.skip(reason)
    from specc.lowering.codegen import load_kernel_module, next_power_of_2
    from specc.lowering.topk_triton import _num_warps, default_chunk
    from specc.lowering.topk_triton import kernel_source as topk_source

    chunk = default_chunk(n_cols, k)
    module = load_kernel_module("topk", topk_source(n_cols=n_cols, k=k, dtype=torch.bfloat16, chunk=chunk,
                                                    narrow=narrow))
    key = "*i32" if narrow else "*i64"
    stage1 = compile_for_gpu(module.topk_chunks_kernel, {"x_ptr": "*i16", "cand_ptr": key, "x_row": "i32"},
                             num_warps=_num_warps(chunk), num_stages=1)
    n_cand = -(-n_cols // chunk) * k
    compile_for_gpu(module.topk_merge_kernel, {"cand_ptr": key, "x_ptr": "*i16", "values_ptr": "*i16",
                                               "indices_ptr": "*i64", "x_row": "i32"},
                    num_warps=_num_warps(next_power_of_2(n_cand)), num_stages=1)
    if narrow:
        assert stage1.asm["ptx"].count("redux.sync.max.s32") == k
