"""passes/rotary_fusion.py: every layer's q and k rotation moves into the attention ops, on both
Llama implementations, and what the program computes does not change."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

import specc
from specc.generate import target_program
from specc.models.llama import LlamaConfig, rotate_half
from specc.passes.pipeline import causal_mask
from specc.passes.rotary_fusion import match_rotation
from tests.models_factory import hf_llama, reference_llama

IMPLEMENTATIONS = {"reference": reference_llama, "hf": hf_llama}
CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2)


def _op_nodes(program, op):
    return [n for n in program.module.graph.nodes if n.op == "call_function" and n.target is op]


@pytest.mark.parametrize("share", ["0", "1"])
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_every_layer_rotates_inside_the_ops_and_the_logits_stay_the_same(implementation, share, monkeypatch):
    monkeypatch.setenv("SPECC_SHARE_ROTARY_TABLES", share)
    torch._dynamo.reset()
    model = IMPLEMENTATIONS[implementation](CONFIG, 3)
    program, _ = target_program(torch.compile(model, backend=specc.backend()))
    assert program.summaries["rotary_fusion"].startswith("rotation moved into 3 of 3 tree_attention and 3 of 3 kv_write")
    # one node per layer's view of each table, or with SPECC_SHARE_ROTARY_TABLES one per table
    assert program.summaries["rotary_fusion"].endswith("(2 cos/sin tables)" if share == "1" else "(6 cos/sin tables)")
    for op in (torch.ops.specc.tree_attention.default, torch.ops.specc.kv_write.default):
        nodes = _op_nodes(program, op)
        assert len(nodes) == 3 and all(n.kwargs.get("rope_cos") is not None for n in nodes)
    # no rotation is left in the program: rotate_half's negation is gone
    assert not [n for n in program.module.graph.nodes if n.target in (operator.neg, torch.neg, "neg")]

    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        expected = out if isinstance(out, torch.Tensor) else out.logits
        k_cache, v_cache = program.new_cache(2, 12)
        cache_len = torch.zeros(2, dtype=torch.int64)
        prefill = program(ids[:, :6], torch.arange(6).expand(2, 6), cache_len, causal_mask(2, 6, "cpu"), k_cache, v_cache)[0]
        cache_len += 6
        steps = [program(ids[:, 6 + t:7 + t], cache_len[:, None] + t, cache_len + t, torch.ones(2, 1, 1, dtype=torch.bool),
                         k_cache, v_cache)[0] for t in range(3)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), expected, rtol=1e-4, atol=1e-4)


def test_switched_off_the_ops_get_rotated_q_and_k(monkeypatch):
    monkeypatch.setenv("SPECC_FUSE_ROTARY", "0")
    torch._dynamo.reset()
    program, _ = target_program(torch.compile(reference_llama(CONFIG, 3), backend=specc.backend()))
    assert program.summaries["rotary_fusion"].startswith("off")
    assert all(n.kwargs.get("rope_cos") is None for n in _op_nodes(program, torch.ops.specc.tree_attention.default))


def test_a_bad_switch_value_names_the_choices(monkeypatch):
    from specc.passes.rotary_fusion import fuse_rotary_default

    monkeypatch.setenv("SPECC_FUSE_ROTARY", "yes")
    with pytest.raises(ValueError, match="SPECC_FUSE_ROTARY='yes'; use 1"):
        fuse_rotary_default()


def _traced(fn, *example):
    """fn's FX graph with each node's value in meta['val'] (what the pass reads shapes from)."""
    gm = fx.symbolic_trace(fn)

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            node.meta["val"] = value
            return value

    Recorder(gm).run(*example)
    return gm


def _output_value_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


X = torch.randn(2, 4, 5, 8)
COS, SIN = torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)


@pytest.mark.parametrize("fn", [
    lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * s,
    lambda x, c, s: s * torch.cat((-x[..., 4:], x[..., :4]), -1) + c * x,  # operands swapped
])
def test_the_matcher_finds_the_llama_rotation(fn):
    gm = _traced(fn, X, COS, SIN)
    x, cos, sin = (n for n in gm.graph.nodes if n.op == "placeholder")
    assert match_rotation(_output_value_node(gm)) == (x, cos, sin)
    torch.testing.assert_close(fn(X, COS, SIN), X * COS + rotate_half(X) * SIN)


@pytest.mark.parametrize("fn", [
    lambda x, c, s: x * c + torch.cat((x[..., 4:], x[..., :4]), dim=-1) * s,  # no negation
    lambda x, c, s: x * c + torch.cat((-x[..., :4], x[..., 4:]), dim=-1) * s,  # halves swapped
    lambda x, c, s: x * c + torch.cat((-x[..., 3:], x[..., :3]), dim=-1) * s,  # halves of the wrong width
    lambda x, c, s: c * c + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * s,  # not x * cos
    lambda x, c, s: x * c - torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * s,  # a difference
])
def test_the_matcher_leaves_what_is_not_the_rotation(fn):
    gm = _traced(fn, X, COS, SIN)
    assert match_rotation(_output_value_node(gm)) is None
