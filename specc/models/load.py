"""Load a llama GGUF (by default the embedded SmolLM2-135M-Instruct) as a ready model + tokenizer.

`load_llama` builds specc's reference `Llama`; `load_hf_llama` builds transformers'
`LlamaForCausalLM` from the same config and the same dequantized weights, so the two compute
the same function. Parameters are cast to `dtype`; buffers (the RoPE inverse frequencies) stay
in fp32, as HF keeps them, so bf16 models do not lose RoPE precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from specc.models.fetch import fetch_default_gguf
from specc.models.gguf_loader import GGUFFile, llama_config_from_gguf, llama_state_dict_from_gguf, open_gguf
from specc.models.llama import Llama, LlamaConfig
from specc.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    import transformers


def _open(path: str | os.PathLike[str] | None) -> GGUFFile:
    return open_gguf(fetch_default_gguf() if path is None else Path(path))


def _fill(
    model: nn.Module, state_dict: dict[str, torch.Tensor], tied: bool, dtype: torch.dtype, device: str | torch.device
) -> None:
    """Copy the weights in, keep the tie, then move to `device` and cast parameters only."""
    weights = dict(state_dict)
    if tied:
        # Both modules list the shared weight under both names; the copy lands in the one Parameter.
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True)
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.eval()


def load_llama(
    path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Llama, Tokenizer]:
    """specc's reference `Llama` and its tokenizer from a GGUF (`path=None`: the default model)."""
    gf = _open(path)
    config = llama_config_from_gguf(gf)
    state_dict = llama_state_dict_from_gguf(gf, config)
    model = Llama(config)
    _fill(model, state_dict, config.tie_word_embeddings, dtype, device)
    return model, Tokenizer.from_gguf(gf)


def hf_config(config: LlamaConfig, tokenizer: Tokenizer | None = None) -> transformers.LlamaConfig:
    """The transformers `LlamaConfig` equal to specc's `LlamaConfig`."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "load_hf_llama needs transformers, which is not installed; run `pip install 'specc[hf]'` "
            "(or `pip install transformers`), or use load_llama for specc's own Llama"
        ) from e
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **config.rope_scaling}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_id if tokenizer else None,
        eos_token_id=tokenizer.eos_id if tokenizer else None,
        pad_token_id=tokenizer.eos_id if tokenizer else None,
    )


def load_hf_llama(
    path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[transformers.LlamaForCausalLM, Tokenizer]:
    """transformers' `LlamaForCausalLM` with the GGUF's weights, and the tokenizer."""
    gf = _open(path)
    config = llama_config_from_gguf(gf)
    tokenizer = Tokenizer.from_gguf(gf)
    hf_cfg = hf_config(config, tokenizer)
    import transformers

    state_dict = llama_state_dict_from_gguf(gf, config)
    model = transformers.LlamaForCausalLM(hf_cfg)
    _fill(model, state_dict, config.tie_word_embeddings, dtype, device)
    return model, tokenizer
