"""Read a llama-architecture GGUF into specc's `LlamaConfig` and an HF-named fp32 state dict.

Three steps:

1. `open_gguf` walks the file's header with bounds checks of its own before `gguf.GGUFReader`
   sees it, so a truncated or corrupt file raises `GGUFError` naming the file, the byte offset
   and the tensor or key concerned, instead of a numpy reshape error or an endless loop over a
   garbage array length (GGUFReader trusts every length it reads).
2. `llama_config_from_gguf` maps the `llama.*` metadata onto `LlamaConfig`.
3. `llama_state_dict_from_gguf` dequantizes every tensor with `gguf.quants.dequantize`, renames
   it to HF's `LlamaForCausalLM` names and undoes llama.cpp's Q/K row permutation.

About that permutation: llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) of each head, HF and
specc rotate the two halves (x[i], x[i + d/2]) (`rotate_half`). `convert_hf_to_gguf.py`
(`LlamaModel.permute`) therefore reorders the output rows of q_proj and k_proj, per head, with
`w.reshape(n_head, 2, d // 2, n_in).swapaxes(1, 2)`: HF row `half * d/2 + i` becomes GGUF row
`2 * i + half`. `unpermute_qk` is its inverse. k_proj uses the number of KV heads.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from specc.models.llama import LlamaConfig

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_GGML_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_NESTING = 8

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
# The smallest encoding of one element of each value type, to bound array lengths cheaply.
_STRING_MIN_SIZE = 8
_ARRAY_MIN_SIZE = 12

_REFETCH_HINT = "the download was probably cut short or the file damaged; delete it and fetch it again"


class GGUFError(ValueError):
    """A GGUF file that is damaged, truncated, or not a llama model specc can load."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the GGUF header. `shape` is in torch order (outermost first)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


class _HeaderCursor:
    """Reads the header of a GGUF through a bounds-checked cursor."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.pos = 0

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}; {_REFETCH_HINT}")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.fail(
                f"the header is cut off: {what} at byte {start} needs {n} bytes but the file ends at "
                f"byte {self.size}"
            )
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        start = self.take(length, what)
        try:
            return self.buf[start:start + length].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8 ({e.reason})") from None

    def skip_value(self, value_type: int, key: str, depth: int = 0) -> None:
        if value_type in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[value_type], f"the value of {key!r}")
        elif value_type == GGUFValueType.STRING:
            self.take(self.u64(f"the length of {key!r}"), f"the string value of {key!r}")
        elif value_type == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise self.fail(f"{key!r} nests arrays more than {_MAX_ARRAY_NESTING} deep")
            item_type = self.u32(f"the item type of array {key!r}")
            count = self.u64(f"the length of array {key!r}")
            if item_type in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[item_type], f"the {count} items of array {key!r}")
                return
            min_size = {GGUFValueType.STRING: _STRING_MIN_SIZE, GGUFValueType.ARRAY: _ARRAY_MIN_SIZE}.get(item_type)
            if min_size is None:
                raise self.fail(f"array {key!r} at byte {self.pos} has unknown item type {item_type}")
            if count * min_size > self.size - self.pos:
                raise self.fail(
                    f"array {key!r} claims {count} items, more than the {self.size - self.pos} bytes "
                    f"left in the file can hold"
                )
            for _ in range(count):
                self.skip_value(item_type, key, depth + 1)
        else:
            raise self.fail(f"{key!r} at byte {self.pos} has unknown value type {value_type}")


def _scan_layout(path: Path, buf: mmap.mmap) -> tuple[list[GGUFTensorInfo], int]:
    """Walk the header; return the tensor entries and the byte where tensor data starts."""
    cur = _HeaderCursor(buf, path)
    magic = bytes(buf[:4])
    if magic != _GGUF_MAGIC:
        raise GGUFError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}; "
            f"{_REFETCH_HINT}"
        )
    cur.take(4, "the magic")
    version = cur.u32("the version")
    if version not in _SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path} is a big-endian GGUF; specc reads only little-endian files")
        raise GGUFError(
            f"{path} has GGUF version {version}; specc reads versions {_SUPPORTED_VERSIONS} "
            f"(convert it with a recent llama.cpp, or {_REFETCH_HINT})"
        )
    tensor_count = cur.u64("the tensor count")
    kv_count = cur.u64("the metadata count")

    alignment = _DEFAULT_ALIGNMENT
    seen_keys: set[str] = set()
    for index in range(kv_count):
        key = cur.string(f"the name of metadata entry {index}")
        if key in seen_keys:
            raise cur.fail(f"metadata key {key!r} appears twice")
        seen_keys.add(key)
        value_type = cur.u32(f"the type of {key!r}")
        if key == "general.alignment" and value_type == GGUFValueType.UINT32:
            alignment = cur.u32(f"the value of {key!r}")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment is {alignment}, not a power of two")
        else:
            cur.skip_value(value_type, key)

    tensors: list[GGUFTensorInfo] = []
    seen_names: set[str] = set()
    for index in range(tensor_count):
        name = cur.string(f"the name of tensor {index}")
        if name in seen_names:
            raise cur.fail(f"tensor {name!r} appears twice")
        seen_names.add(name)
        n_dims = cur.u32(f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= _GGML_MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {_GGML_MAX_DIMS}")
        ggml_dims = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        raw_type = cur.u32(f"the type of tensor {name!r}")
        offset = cur.u64(f"the data offset of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown ggml type id {raw_type}") from None
        if ggml_dims[0] % block_size:
            raise cur.fail(
                f"tensor {name!r} ({ggml_type.name}) has a row of {ggml_dims[0]} elements, not a "
                f"multiple of the block size {block_size}"
            )
        n_bytes = math.prod(ggml_dims) // block_size * type_size
        tensors.append(GGUFTensorInfo(name, ggml_type, tuple(reversed(ggml_dims)), offset, n_bytes))

    data_start = -(-cur.pos // alignment) * alignment
    for info in sorted(tensors, key=lambda t: t.offset):
        end = data_start + info.offset + info.n_bytes
        if end > cur.size:
            missing = sum(1 for t in tensors if data_start + t.offset + t.n_bytes > cur.size)
            raise GGUFError(
                f"{path}: the file ends at byte {cur.size} but tensor {info.name!r} needs bytes up to "
                f"{end} ({missing} of {len(tensors)} tensors lie past the end); {_REFETCH_HINT}"
            )
    return tensors, data_start


class GGUFFile:
    """A GGUF file whose layout was checked, opened with `gguf.GGUFReader`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path} has {size} bytes, too few for a GGUF header; {_REFETCH_HINT}")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            infos, self.data_start = _scan_layout(self.path, buf)
        self.tensor_infos = {info.name: info for info in infos}
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:
            # The scan above should catch every malformed layout; this names the rest.
            raise GGUFError(f"{self.path}: gguf could not parse it ({type(e).__name__}: {e}); {_REFETCH_HINT}") from e
        self._tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        """The value of a metadata key (lists for arrays), `default` if absent and not required."""
        field = self.reader.fields.get(key)
        if field is None:
            if required:
                raise GGUFError(f"{self.path} lacks the metadata key {key!r}, which specc needs")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read ({e}); {_REFETCH_HINT}") from e

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to a fresh fp32 torch tensor in torch shape order."""
        if name not in self.tensor_infos:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        info = self.tensor_infos[name]
        raw = self._tensors[name]
        try:
            values = gguf.quants.dequantize(raw.data, info.ggml_type)
        except NotImplementedError:
            raise GGUFError(
                f"{self.path}: tensor {name!r} is {info.ggml_type.name}, which the installed gguf "
                f"package cannot dequantize; upgrade gguf or use a GGUF quantized as F32, F16, BF16, "
                f"Q8_0, Q4_0/1, Q5_0/1 or a K-quant"
            ) from None
        # F32 comes back as a read-only view of the memory map: copy it so torch owns writable memory.
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(info.shape))


def open_gguf(path: str | os.PathLike[str] | GGUFFile) -> GGUFFile:
    """Open a GGUF after checking its layout; passes a `GGUFFile` through unchanged."""
    return path if isinstance(path, GGUFFile) else GGUFFile(path)


def _decimal(value: float) -> float:
    # GGUF stores epsilons and rope bases as float32; the shortest decimal that rounds to the same
    # float32 (1e-05, not 9.999999747378752e-06) is the value the model was trained with.
    return float(str(np.float32(value)))


def llama_config_from_gguf(source: str | os.PathLike[str] | GGUFFile) -> LlamaConfig:
    """Build a `LlamaConfig` from a llama GGUF's `llama.*` metadata and tensor list."""
    gf = open_gguf(source)
    arch = gf.metadata("general.architecture", required=True)
    if arch != "llama":
        raise GGUFError(f"{gf.path} holds a {arch!r} model; specc loads only the 'llama' architecture")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gf.metadata(f"llama.{name}", default, required=required)
        if isinstance(value, list):
            raise GGUFError(
                f"{gf.path}: llama.{name} is a per-layer list {value[:8]}; specc needs one value for all layers"
            )
        return value

    if key("expert_count", 0):
        raise GGUFError(
            f"{gf.path} is a mixture-of-experts llama ({key('expert_count')} experts); specc loads dense llamas only"
        )
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type != "none" or "rope_freqs.weight" in gf.tensor_infos:
        raise GGUFError(
            f"{gf.path} uses RoPE scaling ({scaling_type if scaling_type != 'none' else 'rope_freqs.weight'}), "
            f"which specc's GGUF loader does not map; load the HF checkpoint instead"
        )

    hidden = key("embedding_length", required=True)
    n_heads = key("attention.head_count", required=True)
    n_kv_heads = key("attention.head_count_kv", n_heads)
    head_dim = key("attention.key_length", hidden // n_heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{gf.path} has different key and value head sizes; specc's Llama needs them equal")
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{gf.path} rotates {rope_dims} of {head_dim} head dimensions; specc supports full RoPE only")

    tokens = gf.metadata("tokenizer.ggml.tokens")
    embed = gf.tensor_infos.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{gf.path} has no token_embd.weight tensor; it is not a complete llama model")
    vocab_size = len(tokens) if tokens is not None else key("vocab_size", embed.shape[0])
    if embed.shape[0] != vocab_size:
        raise GGUFError(
            f"{gf.path}: token_embd.weight has {embed.shape[0]} rows but the vocabulary has "
            f"{vocab_size} tokens; the file is inconsistent"
        )
    try:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length", required=True),
            num_hidden_layers=key("block_count", required=True),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_decimal(key("attention.layer_norm_rms_epsilon", required=True)),
            rope_theta=_decimal(key("rope.freq_base", 10000.0)),
            rope_scaling=None,
            tie_word_embeddings="output.weight" not in gf.tensor_infos,
            max_position_embeddings=key("context_length", 2048),
        )
    except ValueError as e:
        raise GGUFError(f"{gf.path}: its metadata describes an impossible llama: {e}") from e


def _hf_names(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (HF name, expected torch shape)."""
    h, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    names = {
        "token_embd.weight": ("model.embed_tokens.weight", (v, h)),
        "output_norm.weight": ("model.norm.weight", (h,)),
    }
    if not config.tie_word_embeddings:
        names["output.weight"] = ("lm_head.weight", (v, h))
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}"
        names.update({
            f"blk.{i}.attn_norm.weight": (f"{hf}.input_layernorm.weight", (h,)),
            f"blk.{i}.attn_q.weight": (f"{hf}.self_attn.q_proj.weight", (q_rows, h)),
            f"blk.{i}.attn_k.weight": (f"{hf}.self_attn.k_proj.weight", (kv_rows, h)),
            f"blk.{i}.attn_v.weight": (f"{hf}.self_attn.v_proj.weight", (kv_rows, h)),
            f"blk.{i}.attn_output.weight": (f"{hf}.self_attn.o_proj.weight", (h, q_rows)),
            f"blk.{i}.ffn_norm.weight": (f"{hf}.post_attention_layernorm.weight", (h,)),
            f"blk.{i}.ffn_gate.weight": (f"{hf}.mlp.gate_proj.weight", (f, h)),
            f"blk.{i}.ffn_up.weight": (f"{hf}.mlp.up_proj.weight", (f, h)),
            f"blk.{i}.ffn_down.weight": (f"{hf}.mlp.down_proj.weight", (h, f)),
        })
    return names


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head Q/K row interleaving: GGUF row `2i + half` -> HF row `half*d/2 + i`.

    `n_heads` is the number of query heads for q_proj and of KV heads for k_proj.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"a Q/K weight with {rows} rows cannot hold {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama_state_dict_from_gguf(
    source: str | os.PathLike[str] | GGUFFile, config: LlamaConfig | None = None
) -> dict[str, torch.Tensor]:
    """Dequantize a llama GGUF into an fp32 state dict with HF `LlamaForCausalLM` names.

    `lm_head.weight` is present only when the model is untied (the GGUF has `output.weight`).
    """
    gf = open_gguf(source)
    config = config or llama_config_from_gguf(gf)
    names = _hf_names(config)
    missing = [name for name in names if name not in gf.tensor_infos]
    if missing:
        raise GGUFError(
            f"{gf.path} lacks {len(missing)} tensor(s) a {config.num_hidden_layers}-layer llama needs, "
            f"e.g. {missing[:5]}; the file is incomplete or not a llama model"
        )
    unexpected = sorted(set(gf.tensor_infos) - set(names))
    if unexpected:
        raise GGUFError(
            f"{gf.path} has tensors specc's Llama has no place for: {unexpected[:8]}; "
            f"the model is a llama variant specc does not support"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for gguf_name, (hf_name, shape) in names.items():
        found = gf.tensor_infos[gguf_name].shape
        if found != shape:
            raise GGUFError(
                f"{gf.path}: tensor {gguf_name!r} has shape {found} but the metadata implies {shape}; "
                f"the file is inconsistent"
            )
        weight = gf.tensor(gguf_name)
        if gguf_name.endswith("attn_q.weight"):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            weight = unpermute_qk(weight, config.num_key_value_heads)
        state_dict[hf_name] = weight.contiguous()
    return state_dict


def load_gguf_llama(path: str | os.PathLike[str] | GGUFFile) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """`(LlamaConfig, fp32 HF-named state dict)` of a llama GGUF."""
    gf = open_gguf(path)
    config = llama_config_from_gguf(gf)
    return config, llama_state_dict_from_gguf(gf, config)
