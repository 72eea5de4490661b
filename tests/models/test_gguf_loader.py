"""Tests for specc/models/gguf_loader.py on tiny synthetic GGUF files written with gguf.GGUFWriter."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from specc.models.gguf_loader import (
    GGUFError,
    llama_config_from_gguf,
    load_gguf_llama,
    open_gguf,
    unpermute_qk,
)
from specc.models.llama import Llama, LlamaConfig
from specc.models.load import load_hf_llama, load_llama

# Matrix input dims are multiples of 32 so every matrix can be block-quantized (Q8_0, Q4_1).
TINY = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=True, max_position_embeddings=256,
)

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as the converter applies it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]


def hf_state_dict(config: LlamaConfig) -> dict[str, torch.Tensor]:
    """A random HF-layout state dict (norm weights random too, so a swapped norm would show)."""
    model = Llama(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def write_llama_gguf(
    path: Path,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    matrix_type: Q = Q.F32,
    architecture: str = "llama",
    skip: tuple[str, ...] = (),
) -> Path:
    """Write `state` the way llama.cpp's converter does: GGUF names, Q/K rows permuted."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
    writer.add_token_list(tokens + [f"x{i}" for i in range(config.vocab_size - len(tokens))])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(2)
    for hf_name, tensor in state.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        data = tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        if data.ndim == 2 and matrix_type != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(data, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = hf_state_dict(TINY)
    return write_llama_gguf(tmp_path / "tiny.gguf", TINY, state), state


@pytest.mark.parametrize("n_heads,head_dim", [(1, 4), (2, 8), (3, 64), (9, 64)])
def test_unpermute_qk_inverts_llama_cpp_permute(n_heads: int, head_dim: int) -> None:
    weight = torch.randn(n_heads * head_dim, 5)
    permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), n_heads))
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, n_heads), weight)


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's normal RoPE: rotate adjacent pairs (x[2i], x[2i+1]). x: [heads, T, d]."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF / specc RoPE with rotate_half: rotate (x[i], x[i + d/2])."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def test_unpermuted_weights_under_half_rope_score_like_gguf_weights_under_interleaved_rope() -> None:
    # The loader's job in one property: attention scores from the GGUF weights with llama.cpp's
    # RoPE equal those from the loaded weights with rotate_half RoPE.
    n_heads, head_dim, hidden, seq, theta = 3, 16, 24, 7, 10000.0
    hf_q = torch.randn(n_heads * head_dim, hidden, dtype=torch.float64)
    hf_k = torch.randn(n_heads * head_dim, hidden, dtype=torch.float64)
    gguf_q = torch.from_numpy(llama_cpp_permute(hf_q.numpy(), n_heads))
    gguf_k = torch.from_numpy(llama_cpp_permute(hf_k.numpy(), n_heads))
    x = torch.randn(seq, hidden, dtype=torch.float64)

    def scores(wq: torch.Tensor, wk: torch.Tensor, rope) -> torch.Tensor:
        q = rope((x @ wq.T).view(seq, n_heads, head_dim).transpose(0, 1), theta)
        k = rope((x @ wk.T).view(seq, n_heads, head_dim).transpose(0, 1), theta)
        return q @ k.transpose(-1, -2)

    expected = scores(gguf_q, gguf_k, interleaved_rope)
    loaded = scores(unpermute_qk(gguf_q, n_heads), unpermute_qk(gguf_k, n_heads), half_rope)
    torch.testing.assert_close(loaded, expected, rtol=1e-10, atol=1e-10)
    # Without the un-permutation the scores differ: the test can fail.
    assert not torch.allclose(scores(gguf_q, gguf_k, half_rope), expected, atol=1e-3)


def test_f32_gguf_loads_back_to_the_hf_state_dict(tiny_gguf) -> None:
    path, state = tiny_gguf
    config, loaded = load_gguf_llama(path)
    assert config == TINY
    assert set(loaded) == set(state)
    assert "lm_head.weight" not in loaded
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name


def test_loaded_weights_give_the_original_models_logits(tiny_gguf) -> None:
    path, state = tiny_gguf
    config, loaded = load_gguf_llama(path)
    original, restored = Llama(TINY).eval(), Llama(config).eval()
    original.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    restored.load_state_dict({**loaded, "lm_head.weight": loaded["model.embed_tokens.weight"]})
    ids = torch.randint(0, TINY.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(restored(ids), original(ids))


def test_untied_gguf_has_lm_head(tmp_path: Path) -> None:
    config = LlamaConfig(**{**TINY.to_dict(), "tie_word_embeddings": False})
    state = hf_state_dict(config)
    config_loaded, loaded = load_gguf_llama(write_llama_gguf(tmp_path / "untied.gguf", config, state))
    assert config_loaded.tie_word_embeddings is False
    assert torch.equal(loaded["lm_head.weight"], state["lm_head.weight"])
    assert not torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])


@pytest.mark.parametrize("qtype,max_error", [(Q.Q8_0, 0.02), (Q.Q4_1, 0.3)])
def test_quantized_gguf_dequantizes_and_unpermutes(tmp_path: Path, qtype: Q, max_error: float) -> None:
    state = hf_state_dict(TINY)
    _, loaded = load_gguf_llama(write_llama_gguf(tmp_path / f"{qtype.name}.gguf", TINY, state, qtype))
    for name, tensor in state.items():
        if tensor.ndim == 2:
            # Exactly what gguf's own quantize -> dequantize gives for the HF-layout rows (quantization
            # works per row, so it commutes with the row permutation).
            reference = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            assert torch.equal(loaded[name], torch.from_numpy(reference.reshape(tensor.shape))), name
        assert (loaded[name] - tensor).abs().max() <= max_error * tensor.abs().max(), name


def test_load_llama_and_load_hf_llama_compute_the_same_logits(tiny_gguf) -> None:
    path, _ = tiny_gguf
    ours, tokenizer = load_llama(path)
    theirs, _ = load_hf_llama(path)
    assert tokenizer.eos_id == 2 and tokenizer.encode("ab") == [5]
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert not ours.training and not theirs.training
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_llama_casts_parameters_but_keeps_rope_in_fp32(tiny_gguf) -> None:
    path, state = tiny_gguf
    model, _ = load_llama(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"].to(torch.bfloat16))


def test_rms_eps_comes_back_as_the_written_decimal(tiny_gguf) -> None:
    # float32(1e-5) is 9.99999974e-06; the loader returns the decimal that was meant.
    path, _ = tiny_gguf
    assert llama_config_from_gguf(path).rms_norm_eps == 1e-5


def test_truncated_file_names_the_first_tensor_past_the_end(tiny_gguf) -> None:
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = len(data) * 2 // 3
    path.write_bytes(data[:cut])
    expected = rf"ends at byte {cut} but tensor 'blk\.\d\.\w+\.weight' needs bytes up to \d+.*fetch it again"
    with pytest.raises(GGUFError, match=expected) as info:
        open_gguf(path)
    assert str(path) in str(info.value)


def test_file_cut_inside_the_header_is_a_gguf_error(tiny_gguf) -> None:
    path, _ = tiny_gguf
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GGUFError, match="header is cut off"):
        open_gguf(path)


@pytest.mark.parametrize("content,message", [(b"", "too few"), (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file")])
def test_non_gguf_files_are_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        open_gguf(path)


def test_garbage_array_length_is_an_error_not_a_hang(tiny_gguf) -> None:
    path, _ = tiny_gguf
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    # key string, then value type (u32), item type (u32), item count (u64).
    count_at = data.index(key) + len(key) + 8
    struct.pack_into("<Q", data, count_at, 2**62)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens"):
        open_gguf(path)


def test_unsupported_version_is_named(tiny_gguf) -> None:
    path, _ = tiny_gguf
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="version 99"):
        open_gguf(path)


def test_gguf_error_is_a_value_error() -> None:
    assert issubclass(GGUFError, ValueError)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "partial.gguf", TINY, hf_state_dict(TINY), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf_llama(path)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "qwen.gguf", TINY, hf_state_dict(TINY), architecture="qwen2")
    with pytest.raises(GGUFError, match="'qwen2'"):
        load_gguf_llama(path)
