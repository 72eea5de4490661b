"""Tiny random models of both implementations from one LlamaConfig, with equal weights."""

from __future__ import annotations

import torch

from specc.models.llama import Llama, LlamaConfig
from tests.strategies import seeded_weights


def reference_llama(config: LlamaConfig, seed: int = 0, dtype=torch.float32) -> Llama:
    return seeded_weights(Llama(config), seed).to(dtype).eval()


def hf_llama(config: LlamaConfig, seed: int = 0, dtype=torch.float32):
    """HF LlamaForCausalLM with the same weights as reference_llama(config, seed)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_type": "llama3", "rope_theta": config.rope_theta}
    hf_config = HFConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config).eval()
    reference = reference_llama(config, seed)
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (config.tie_word_embeddings and m == "lm_head.weight") for m in missing), missing
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)
