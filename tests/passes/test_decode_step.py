"""The compiled plain decode step: what Inductor makes of it (CPU)."""

from __future__ import annotations

import re

import torch
from torch._inductor.utils import run_and_get_code

import specc
from specc.generate import target_program
from specc.models.llama import LlamaConfig
from specc.passes.decode_step import Sampling, make_plain_step
from tests.models_factory import reference_llama


def _top_level_arguments(call: str) -> list[str]:
    """The comma-separated arguments of `name(a, f(b, c), d)`, nested calls kept whole."""
    inner = call[call.index("(") + 1:]
    arguments, depth, current = [], 0, ""
    for char in inner:
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        if char == "," and depth == 0:
            arguments.append(current.strip())
            current = ""
        else:
            current += char
    return arguments + [current.strip()]


def _plain_step_code(layers: int, tokens: torch.Tensor, cache_len: torch.Tensor) -> list[str]:
    """Inductor's code for the plain decode step of a small reference Llama of `layers` layers,
    after one run of it (cache_len advances)."""
    torch._dynamo.reset()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    program, _ = target_program(torch.compile(reference_llama(config, 5), backend=specc.backend()))
    step = torch.compile(make_plain_step(program, Sampling()), fullgraph=True, dynamic=False)
    k_cache, v_cache = program.new_cache(len(tokens), 16)
    with torch.no_grad():
        _, codes = run_and_get_code(step, tokens, cache_len, k_cache, v_cache, torch.zeros(len(tokens), dtype=torch.int64))
    return codes


def test_every_layer_of_the_plain_step_reads_one_mask_input():
    """The one-token mask is a graph input shared by every layer's attention. Built inside the
    step, Inductor refilled a mask buffer before each layer's attention: a kernel per layer
    (30 a step on the real model)."""
    cache_len = torch.tensor([4, 6])
    codes = _plain_step_code(3, torch.tensor([[3], [7]]), cache_len)
    # the attention op and its mask argument: kv_write_attention by default, tree_attention with
    # SPECC_FUSE_KV_WRITE=0
    ops = {"torch.ops.specc.kv_write_attention.default(": 7, "torch.ops.specc.tree_attention.default(": 5}
    calls = [(line, op) for code in codes for line in code.splitlines() for op in ops if op in line]
    assert len(calls) == 3
    masks = {_top_level_arguments(op + line.split(op, 1)[1])[ops[op]] for line, op in calls}
    assert len(masks) == 1, f"each layer's attention reads its own mask buffer: {sorted(masks)}"
    # an input, or a view of one (the batch expand): reinterpret_tensor(argN_1, ...)
    assert re.fullmatch(r"(reinterpret_tensor\()?arg\d+_1\b.*", masks.pop()), "the mask is computed inside the step"
    assert cache_len.tolist() == [5, 7]  # the step ran and advanced


def test_with_shared_rotary_tables_every_op_of_the_plain_step_reads_one_buffer_per_table(monkeypatch):
    """SPECC_SHARE_ROTARY_TABLES=1: one kernel computes cos and sin, and every layer's kv_write and
    tree_attention read those two buffers. Without it Inductor copies the tables for each op,
    a kernel per four layers (passes/rotary_fusion.share_tables_default)."""
    monkeypatch.setenv("SPECC_SHARE_ROTARY_TABLES", "1")
    cache_len = torch.tensor([4])
    codes = _plain_step_code(9, torch.tensor([[3]]), cache_len)
    ops = ("torch.ops.specc.kv_write.default(", "torch.ops.specc.tree_attention.default(")
    tables = [tuple(_top_level_arguments(op + line.split(op, 1)[1])[-2:])
              for code in codes for line in code.splitlines() for op in ops if op in line]
    assert len(tables) == 2 * 9
    assert len(set(tables)) == 1, f"the ops read {len(set(tables))} pairs of table buffers"
    assert cache_len.tolist() == [5]  # the step ran and advanced
