"""EAGLE draft heads (EAGLE-1/2: arXiv:2401.15077, 2406.16858; EAGLE-3: arXiv:2503.01840).

The draft predicts the target's next feature from (feature at position p, token at p + 1):
    x_p = fc(cat(embed(token_{p+1}), feature_p))          embed: the target's, shared, frozen
    h_p = DecoderLayer(x_p)                                one Llama layer, own KV cache
    logits_{p+2} = lm_head(norm(h_p))                      lm_head: the target's, shared, frozen
EAGLE ("eagle"): feature_p is the target's final hidden state (the LM head's input), and the
draft's h_p stands in for the next feature when drafting deeper.
EAGLE-3 ("eagle3"): feature_p = fc_in(cat(low_p, mid_p, high_p)), three target layer outputs
fused; deeper drafting feeds the draft's own h_p back in the same slot (training-time test).

Only the draft's own weights are saved (safetensors, config in the metadata); embed and
lm_head are attached from the target at load time and checked against the config.

A draft vocabulary (specc/draft/vocab.py) restricts the logits the draft proposes from
(`proposal_logits`, `proposal_tokens`) to the K tokens the target wrote most in the head's
training responses, over the matching rows of the target's LM head; `logits` (training,
evaluation) always covers the whole vocabulary. A head file may carry those counts (tensor
`token_counts`) and its default K (metadata `specc_draft_vocab`, 0: the whole vocabulary).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specc.models.llama import DecoderLayer, LlamaConfig, RMSNorm, RotaryEmbedding

KINDS = ("eagle", "eagle3")


class DraftConfigError(ValueError):
    """A draft head does not fit the target it is attached to."""


@dataclass(frozen=True)
class DraftConfig:
    kind: str
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = field(default=None, hash=False)
    feature_layers: tuple[int, ...] = ()  # EAGLE-3: (low, mid, high) target layer indices

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DraftConfigError(f"draft kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "eagle3" and len(self.feature_layers) != 3:
            raise DraftConfigError(f"eagle3 fuses three target layers; got feature_layers={self.feature_layers}")
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))

    @classmethod
    def for_target(cls, target: LlamaConfig, kind: str = "eagle") -> DraftConfig:
        layers = target.num_hidden_layers
        feature_layers = (min(2, layers - 1), layers // 2, max(layers - 3, 0)) if kind == "eagle3" else ()
        return cls(
            kind=kind,
            hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            head_dim=target.head_dim,
            intermediate_size=target.intermediate_size,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            feature_layers=feature_layers,
        )

    def layer_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=1, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DraftConfig:
        return cls(**json.loads(text))


class EagleDraft(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        if config.kind == "eagle3":
            self.fc_in = nn.Linear(3 * hidden, hidden, bias=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DecoderLayer(config.layer_config())
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.layer_config())
        # The target's embedding and LM head, attached (not owned, not saved).
        self._shared: dict[str, torch.Tensor] = {}
        # The draft vocabulary (int64 [K] ascending token ids) or None: the whole vocabulary.
        self.draft_vocab: torch.Tensor | None = None
        self.draft_vocab_version = 0  # bumped on every change: specc.generate builds new engines then
        # How often the target wrote each token in the head's training responses, or None.
        self.token_counts: torch.Tensor | None = None

    # ----- the target's pieces -------------------------------------------------------------
    def attach(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> EagleDraft:
        expected = (self.config.vocab_size, self.config.hidden_size)
        for name, weight in (("embedding", embed_weight), ("LM head", lm_head_weight)):
            if tuple(weight.shape) != expected:
                raise DraftConfigError(
                    f"the target's {name} is {tuple(weight.shape)} but the draft was built for "
                    f"[vocab {expected[0]}, hidden {expected[1]}]; train or load a draft for this target"
                )
        self._shared = {"embed": embed_weight.detach(), "lm_head": lm_head_weight.detach()}
        if self.draft_vocab is not None:
            self._gather_vocab_head()
        return self

    def attach_to(self, target: nn.Module) -> EagleDraft:
        """Attach the embedding and LM head of a reference Llama or HF LlamaForCausalLM."""
        return self.attach(target.model.embed_tokens.weight, target.lm_head.weight)

    def _need_shared(self) -> dict[str, torch.Tensor]:
        if not self._shared:
            raise DraftConfigError("the draft has no target attached; call draft.attach_to(target_model) first")
        return self._shared

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self._need_shared()["embed"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary [..., V] (training and evaluation)."""
        return F.linear(self.norm(hidden), self._need_shared()["lm_head"])

    # ----- the draft vocabulary: what decoding proposes from -----------------------------------
    def set_draft_vocab(self, ids: torch.Tensor | None) -> EagleDraft:
        """Propose from these token ids only (int [K], strictly ascending), or from the whole
        vocabulary (None). The LM head rows are gathered once here (and on attach), not per step."""
        from specc.draft.vocab import check_draft_vocab

        self.draft_vocab_version += 1
        if ids is None:
            self.draft_vocab = None
            self._shared.pop("vocab_head", None)
            self._shared.pop("vocab_ids", None)
            return self
        self.draft_vocab = check_draft_vocab(ids, self.config.vocab_size)
        if self._shared:
            self._gather_vocab_head()
        return self

    def use_draft_vocab(self, size: int) -> EagleDraft:
        """Propose from the `size` tokens of `token_counts` the target wrote most; 0: all."""
        from specc.draft.vocab import draft_vocab_from_counts

        if size == 0 or size == self.config.vocab_size:
            return self.set_draft_vocab(None)
        if self.token_counts is None:
            raise DraftConfigError(
                "this head carries no token counts to choose a draft vocabulary from; add them with "
                "`specc draft-vocab --draft HEAD --data-dir D --out NEW` or call set_draft_vocab(ids)")
        return self.set_draft_vocab(draft_vocab_from_counts(self.token_counts, size))

    def with_draft_vocab(self, size: int) -> EagleDraft:
        """A twin sharing this head's weights (and target) that proposes from the `size` tokens
        the head's data used most (0: the whole vocabulary); this head is left as it is."""
        twin = copy.copy(self)
        twin._shared = dict(self._shared)
        return twin.use_draft_vocab(size)

    def _gather_vocab_head(self) -> None:
        lm_head = self._shared["lm_head"]
        ids = self.draft_vocab.to(lm_head.device)
        self._shared["vocab_ids"] = ids
        self._shared["vocab_head"] = lm_head.index_select(0, ids)

    def refresh_vocab_head(self) -> None:
        """Re-gather the draft vocabulary's LM head rows in place (same storage, so a captured
        CUDA graph keeps its pointers), after the target's LM head was changed in place."""
        if self.draft_vocab is None or not self._shared:
            return
        shared = self._shared
        if shared["vocab_head"].dtype != shared["lm_head"].dtype or shared["vocab_head"].device != shared["lm_head"].device:
            raise DraftConfigError("the target's LM head moved after the draft was attached; attach the draft again")
        with torch.no_grad():
            torch.index_select(shared["lm_head"], 0, shared["vocab_ids"], out=shared["vocab_head"])

    @property
    def proposal_vocab_size(self) -> int:
        return self.config.vocab_size if self.draft_vocab is None else int(self.draft_vocab.numel())

    def proposal_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits the draft proposes from: [..., K] over the draft vocabulary, or [..., V].
        With SPECC_FUSE_DRAFT_LINEAR=1 the final norm runs inside the head's GEMM
        (specc::fused_linear), when hidden has the head's dtype (as in every decode step)."""
        head = self._need_shared()["lm_head" if self.draft_vocab is None else "vocab_head"]
        if fuse_draft_linear_default() and hidden.dtype == head.dtype == self.norm.weight.dtype:
            import specc.lowering  # noqa: F401  (registers the ops)

            return torch.ops.specc.fused_linear(hidden, head, self.norm.weight, self.norm.eps)
        return F.linear(self.norm(hidden), head)

    def proposal_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into proposal_logits' last dimension."""
        if self.draft_vocab is None:
            return index
        return self._need_shared()["vocab_ids"][index]

    def proposal_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Indices into proposal_logits' last dimension of token ids; -1 for tokens outside the
        draft vocabulary (which the draft can never propose)."""
        if self.draft_vocab is None:
            return tokens
        ids = self._need_shared()["vocab_ids"]
        where = torch.searchsorted(ids, tokens.contiguous()).clamp(max=ids.numel() - 1)
        return torch.where(ids[where] == tokens, where, torch.full_like(where, -1))

    def full_vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., K] over the draft vocabulary as [..., V] (zero outside it)."""
        if self.draft_vocab is None:
            return probs
        ids = self._need_shared()["vocab_ids"]
        full = probs.new_zeros(*probs.shape[:-1], self.config.vocab_size)
        return full.index_copy(-1, ids, probs)

    def fuse_features(self, target_features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Target hidden states -> the draft's feature input [B, T, H]."""
        if self.config.kind == "eagle3":
            return self.fc_in(torch.cat(list(target_features), dim=-1))
        return target_features[0] if isinstance(target_features, (list, tuple)) else target_features

    def _input(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.embed(tokens).to(features.dtype), features], dim=-1))

    # ----- training: causal attention over whole sequences ---------------------------------
    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] (token_{p+1}), features [B, T, H] (feature_p) -> hidden h_p [B, T, H]."""
        x = self._input(tokens, features)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        cos, sin = self.rotary(positions, x.dtype)
        return self.layer(x, cos, sin)

    # ----- decoding: the layer over a static cache through specc ops ------------------------
    def decode(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        cache_len: torch.Tensor,
        tree_mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        stacked: StackedProjections | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Like forward, but writes K/V into the draft cache [1, B, Hkv, S, D] at cache_len + i
        and attends over the cached prefix plus the new tokens under tree_mask [B, T, T].
        With `stacked` (this draft's StackedProjections), q/k/v and gate/up are one GEMM each,
        and with SPECC_FUSE_DRAFT_LINEAR=1 each GEMM takes its norm, SwiGLU, residual add or
        token embedding with it (specc::fused_linear; off by default: slower, see there). `rope`: the (cos, sin) of `positions`
        [B or 1, T, D] when the caller has them (a static tree computes its nodes' once a step)."""
        import specc.lowering  # noqa: F401  (registers the ops)
        from specc.lowering.rotary import rotate_reference
        from specc.passes.kv_write_fusion import fuse_kv_write_default
        from specc.passes.rotary_fusion import fuse_rotary_default

        layer = self.layer
        attn = layer.self_attn
        fused = stacked is not None and fuse_draft_linear_default()
        embed = self._need_shared()["embed"]
        if fused and embed.dtype == features.dtype:
            # fc(cat(embed(tokens), features)) with the embedding rows gathered in the GEMM
            x = torch.ops.specc.fused_linear(features, self.fc.weight, tokens=tokens, embed_weight=embed)
        else:
            x = self._input(tokens, features)
        b, t, _ = x.shape
        q_size, kv_size = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
        if fused:
            norm = layer.input_layernorm
            qkv = torch.ops.specc.fused_linear(x, stacked.qkv, norm.weight, norm.eps)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        elif stacked is None:
            h = layer.input_layernorm(x)
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = F.linear(layer.input_layernorm(x), stacked.qkv).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = k.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        cos, sin = self.rotary(positions, x.dtype) if rope is None else rope
        scale = attn.head_dim**-0.5
        rope_tables = (cos, sin)
        if not fuse_rotary_default():
            q, k = rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)
            rope_tables = (None, None)
        # the ops rotate q and k as they load them (passes/rotary_fusion.py and kv_write_fusion.py
        # do the same for the target)
        if fuse_kv_write_default():
            out = torch.ops.specc.kv_write_attention(q, k, v, k_cache, v_cache, 0, cache_len, tree_mask, scale,
                                                     *rope_tables)
        else:
            torch.ops.specc.kv_write(k_cache, v_cache, 0, k, v, cache_len, *rope_tables)
            out = torch.ops.specc.tree_attention(q, k_cache, v_cache, 0, cache_len, tree_mask, scale, *rope_tables)
        out = out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim)
        if fused:
            fused_linear = torch.ops.specc.fused_linear
            x = fused_linear(out, attn.o_proj.weight, residual=x)
            norm = layer.post_attention_layernorm
            gate_up = fused_linear(x, stacked.gate_up, norm.weight, norm.eps)
            return fused_linear(gate_up, layer.mlp.down_proj.weight, gate=True, residual=x)
        x = x + attn.o_proj(out)
        h = layer.post_attention_layernorm(x)
        if stacked is None:
            return x + layer.mlp(h)
        gate, up = F.linear(h, stacked.gate_up).chunk(2, dim=-1)
        return x + layer.mlp.down_proj(F.silu(gate) * up)

    def new_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (1, batch, c.num_key_value_heads, max_seq_len, c.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    # ----- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        own = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        metadata = {"specc_draft_config": self.config.to_json()}
        if self.token_counts is not None:
            from specc.draft.vocab import draft_vocab_from_counts

            if self.draft_vocab is not None and not torch.equal(
                    self.draft_vocab.cpu(), draft_vocab_from_counts(self.token_counts, self.proposal_vocab_size)):
                raise DraftConfigError("the draft vocabulary is not the top of token_counts, so a saved head could "
                                       "not restore it; choose it with use_draft_vocab(K)")
            own["token_counts"] = self.token_counts.to(torch.int32).cpu()  # counts of a few million: int32 is plenty
            metadata["specc_draft_vocab"] = str(self.proposal_vocab_size if self.draft_vocab is not None else 0)
        elif self.draft_vocab is not None:
            raise DraftConfigError("a head is saved with the token counts its draft vocabulary came from; "
                                   "set draft.token_counts first (specc/draft/vocab.py)")
        save_file(own, str(path), metadata={**metadata, **(extra_metadata or {})})


def fuse_draft_linear_default() -> bool:
    """SPECC_FUSE_DRAFT_LINEAR=1: the draft layer's GEMMs take their norms, SwiGLU, residual adds
    and fc's embedding gather with them (specc::fused_linear). 0 (the default): Inductor's
    kernels and cuBLAS, which measured faster (results/2026-12-03d_h200: the fused draft made the
    H200 step 18% slower, 1.596 against 1.348 ms; lowering/fused_linear.py says why)."""
    from specc.lowering.registry import env_choice

    return env_choice("SPECC_FUSE_DRAFT_LINEAR", "0", {"0": "unfused", "1": "fused"}) == "1"


class StackedProjections:
    """The draft layer's q/k/v weights stacked into one matrix and gate/up into another, so that
    `decode` runs one GEMM for each group instead of three and two (the draft runs once per tree
    level, one token or a few dozen per sequence: its GEMMs cost their launch, not their bytes).
    A copy of the draft's weights: `refresh()` re-reads them in place (same storage, so a captured
    CUDA graph keeps its pointers); specc.generate refreshes before every call."""

    def __init__(self, draft: EagleDraft) -> None:
        self._draft = draft
        qkv, gate_up = self._weights()
        with torch.no_grad():
            self.qkv = torch.cat(qkv)
            self.gate_up = torch.cat(gate_up)

    def _weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        attn, mlp = self._draft.layer.self_attn, self._draft.layer.mlp
        return ([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                [mlp.gate_proj.weight, mlp.up_proj.weight])

    def refresh(self) -> None:
        qkv, gate_up = self._weights()
        if (qkv[0].dtype, qkv[0].device) != (self.qkv.dtype, self.qkv.device):
            raise DraftConfigError(
                f"the draft moved to {qkv[0].dtype} on {qkv[0].device} after its engine was built for "
                f"{self.qkv.dtype} on {self.qkv.device}; compile the model again for the new placement"
            )
        with torch.no_grad():
            torch.cat(qkv, out=self.qkv)
            torch.cat(gate_up, out=self.gate_up)


def load_draft(path: str | Path, target: nn.Module | None = None, dtype: torch.dtype | None = None,
               device=None, draft_vocab: int | None = None) -> EagleDraft:
    """Load a saved draft head; with `target`, check it fits and attach the target's pieces.
    `draft_vocab`: propose from the K tokens the head's data used most (0: the whole vocabulary;
    None: the file's default, specc_draft_vocab)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no draft head at {path}; train one with `specc train-draft` or pass draft=None")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "specc_draft_config" not in metadata:
            raise DraftConfigError(f"{path} has no specc_draft_config metadata; it was not saved by EagleDraft.save")
        config = DraftConfig.from_json(metadata["specc_draft_config"])
        weights = {k: handle.get_tensor(k) for k in handle.keys()}
    draft = EagleDraft(config)
    counts = weights.pop("token_counts", None)
    draft.load_state_dict(weights, strict=True)
    if counts is not None:
        if counts.shape != (config.vocab_size,):
            raise DraftConfigError(f"{path.name}: token_counts has shape {tuple(counts.shape)}, not ({config.vocab_size},)")
        draft.token_counts = counts.to(torch.int64)
    size = int(metadata.get("specc_draft_vocab", 0)) if draft_vocab is None else int(draft_vocab)
    if size:
        draft.use_draft_vocab(size)
    if target is not None:
        target_config = target.config
        if (target_config.hidden_size, target_config.vocab_size) != (config.hidden_size, config.vocab_size):
            raise DraftConfigError(
                f"draft {path.name} was trained for hidden {config.hidden_size} / vocab {config.vocab_size}, "
                f"but the target has hidden {target_config.hidden_size} / vocab {target_config.vocab_size}"
            )
        if config.kind == "eagle3" and max(config.feature_layers) >= target_config.num_hidden_layers:
            raise DraftConfigError(
                f"draft {path.name} reads target layer {max(config.feature_layers)} but the target has "
                f"{target_config.num_hidden_layers} layers"
            )
        param = next(target.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        draft.attach_to(target)
    return cast_parameters(draft, dtype, device).eval()


def cast_parameters(module: nn.Module, dtype: torch.dtype | None, device=None) -> nn.Module:
    """Move to `device` and cast parameters only: the RoPE inverse frequencies stay fp32, as the
    target keeps them, so draft and target rotate by the same angles."""
    module.to(device)
    if dtype is not None:
        for param in module.parameters():
            param.data = param.data.to(dtype)
    return module
