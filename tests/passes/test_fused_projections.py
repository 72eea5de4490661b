"""passes/fused_projections.py: one linear per layer for q/k/v and one for gate/up, same logits."""

from __future__ import annotations

import pytest
import torch

import specc
from specc.generate import target_program
from specc.models.llama import LlamaConfig
from specc.passes.graph_utils import LINEAR, calls
from specc.passes.pipeline import causal_mask
from tests.models_factory import hf_llama, reference_llama

CONFIG = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def _program(model, **options):
    torch._dynamo.reset()
    program, _ = target_program(torch.compile(model, backend=specc.backend(**options)))
    return program


def _linears(program) -> int:
    return sum(1 for n in program.module.graph.nodes if calls(n, LINEAR))


def _prefill_then_decode(program, ids: torch.Tensor, split: int) -> torch.Tensor:
    batch, length = ids.shape
    k_cache, v_cache = program.new_cache(batch, length)
    cache_len = torch.zeros(batch, dtype=torch.int64)
    with torch.no_grad():
        chunks = [program(ids[:, :split], torch.arange(split).expand(batch, split), cache_len,
                          causal_mask(batch, split, "cpu"), k_cache, v_cache)[0]]
        cache_len += split
        for t in range(split, length):
            chunks.append(program(ids[:, t:t + 1], cache_len[:, None].clone(), cache_len,
                                  torch.ones(batch, 1, 1, dtype=torch.bool), k_cache, v_cache)[0])
            cache_len += 1
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("make", [reference_llama, hf_llama], ids=["reference", "hf"])
def test_fused_program_has_one_linear_per_group_and_the_same_logits(make):
    model = make(CONFIG, 3)
    fused, plain = _program(model), _program(model, fuse_projections=False)
    layers = CONFIG.num_hidden_layers
    # per layer: q, k, v, o, gate, up, down unfused; fused qkv, o, fused gate/up, down; plus the LM head
    assert _linears(plain) == 7 * layers + 1
    assert _linears(fused) == 4 * layers + 1
    assert f"q/k/v into one linear in {layers} of {layers}" in fused.summaries["fused_projections"]
    assert "fused_projections" not in plain.summaries
    attention = model.model.layers[1].self_attn
    stacked = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(fused.module.fused_qkv_1, stacked)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_prefill_then_decode(fused, ids, 4), _prefill_then_decode(plain, ids, 4),
                               rtol=1e-5, atol=1e-5)


def test_projections_with_a_bias_are_left_unfused():
    # HF's attention_bias puts a bias on q/k/v (and o): the pass keeps those linears as they were
    model = hf_llama(CONFIG, 4)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias = torch.nn.Parameter(torch.randn(proj.out_features) * 0.1)
    program = _program(model)
    layers = CONFIG.num_hidden_layers
    assert f"q/k/v into one linear in 0 of {layers} layers and gate/up in {layers} of {layers}" in (
        program.summaries["fused_projections"])
    assert _linears(program) == 6 * layers + 1
    ids = torch.randint(0, CONFIG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(_prefill_then_decode(program, ids, 3), expected, rtol=1e-4, atol=1e-4)


def test_refresh_rereads_weights_changed_after_compiling():
    model = reference_llama(CONFIG, 7)
    fused = _program(model)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(8))
    before = _prefill_then_decode(fused, ids, 5)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
        model.model.layers[2].mlp.up_proj.weight.mul_(-1.0)
        expected = model(ids)
    stacked = fused.module.fused_qkv_0
    # the copies do not follow by themselves; refresh (specc.generate calls it) re-reads them in place
    torch.testing.assert_close(_prefill_then_decode(fused, ids, 5), before)
    fused.refresh_stacked_weights()
    assert fused.module.fused_qkv_0.data_ptr() == stacked.data_ptr()
    torch.testing.assert_close(_prefill_then_decode(fused, ids, 5), expected, rtol=1e-4, atol=1e-4)


def test_generate_sees_target_weights_changed_between_calls():
    model = reference_llama(CONFIG, 9)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=specc.backend())
    prompt = [3, 14, 15, 92, 65]
    specc.generate(compiled, [prompt], max_new_tokens=4, compile=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(3.0)
            layer.self_attn.v_proj.weight.mul_(-2.0)
    got = specc.generate(compiled, [prompt], max_new_tokens=6, compile=False).tokens[0]
    ids = torch.tensor([prompt])
    expected = []
    with torch.no_grad():
        for _ in range(6):
            token = int(model(ids)[0, -1].argmax())
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert got == expected


def test_backend_refuses_a_fuse_option_that_is_not_a_bool():
    with pytest.raises(TypeError, match="fuse_projections='yes'"):
        specc.backend(fuse_projections="yes")
