"""Skeleton recognition: what it finds in both implementations, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import specc
from specc.generate import UnsupportedModelError, target_program
from specc.passes.skeleton import recognise_llama
from tests.models_factory import hf_llama, reference_llama
from tests.strategies import llama_configs


def _capture_skeleton(model, hf: bool):
    found = {}

    def backend(gm, example_inputs):
        found["skeleton"] = recognise_llama(gm, example_inputs)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(ids, 1)
    with torch.no_grad():
        compiled(ids, use_cache=False) if hf else compiled(ids)
    return found["skeleton"]


@pytest.mark.parametrize("hf", [False, True], ids=["reference", "hf"])
@settings(max_examples=10)
@given(config=llama_configs(max_layers=4))
def test_skeleton_finds_every_layer_and_projection(hf, config):
    torch._dynamo.reset()
    model = (hf_llama if hf else reference_llama)(config, 0)
    skeleton = _capture_skeleton(model, hf)
    assert len(skeleton.layers) == config.num_hidden_layers
    assert (skeleton.n_heads, skeleton.n_kv_heads, skeleton.head_dim) == (
        config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    assert (skeleton.hidden_size, skeleton.vocab_size) == (config.hidden_size, config.vocab_size)
    weight_of = {node: tensor for node, tensor in skeleton.weights.items()}
    for index, layer in enumerate(skeleton.layers):
        block = model.model.layers[index]
        for node, module in ((layer.q_proj, block.self_attn.q_proj), (layer.k_proj, block.self_attn.k_proj),
                             (layer.v_proj, block.self_attn.v_proj), (layer.o_proj, block.self_attn.o_proj),
                             (layer.gate_proj, block.mlp.gate_proj), (layer.up_proj, block.mlp.up_proj),
                             (layer.down_proj, block.mlp.down_proj)):
            assert weight_of[node.args[1]] is module.weight
        assert layer.scale == pytest.approx(config.head_dim**-0.5)
    assert skeleton.positions


class AttentionWithBias(torch.nn.Module):
    """A causal LM whose graph is not a Llama: biased projections and no rotary embedding."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"vocab_size": 32})()
        self.embed = torch.nn.Embedding(32, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, ids):
        x = self.embed(ids)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + y.transpose(1, 2).flatten(2))


def test_unrecognised_model_warns_names_the_node_and_still_runs_correctly():
    model = AttentionWithBias().eval()
    backend = specc.backend()
    compiled = torch.compile(model, backend=backend)
    with pytest.warns(UserWarning, match=r"did not recognise a Llama .*node '"):
        with pytest.raises(UnsupportedModelError, match="node '"):
            target_program(compiled)
    ids = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
