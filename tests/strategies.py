"""Hypothesis strategies shared by the whole suite: tiny Llama configs, trees, prompts.

Sizes stay small so that hundreds of examples run on CI's two cores.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from specc.models.llama import LlamaConfig


@st.composite
def llama_configs(draw, max_layers: int = 3) -> LlamaConfig:
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    n_heads = n_kv * group
    scaled = draw(st.booleans())
    return LlamaConfig(
        vocab_size=draw(st.sampled_from([61, 96, 128])),
        hidden_size=draw(st.sampled_from([n_heads * head_dim, 24, 48])),
        intermediate_size=draw(st.sampled_from([32, 64])),
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([10000.0, 100000.0])),
        rope_scaling=(
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
            if scaled else None
        ),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=256,
    )


@st.composite
def tree_parents(draw, min_nodes: int = 1, max_nodes: int = 16) -> list[int]:
    """A random rooted tree as a parents list: parents[0] = -1, parents[i] < i."""
    n = draw(st.integers(min_nodes, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def prompts(vocab_size: int, max_batch: int = 3, max_len: int = 12):
    return st.lists(
        st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=max_len),
        min_size=1, max_size=max_batch,
    )


def seeded_weights(module: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Random weights large enough that logits are well separated (no argmax near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5 * 2)
    return module
