"""Online distillation of an EAGLE draft head from its target (EAGLE-1/2 and EAGLE-3).

The target runs inside the training loop (no grad) on the self-distilled sequences of
specc/draft/data.py and gives, at every position, its features and its full next-token
distribution; the draft learns from both. Nothing is precomputed, so no feature files.

Conventions (specc/draft/eagle.py, passes/speculative_step.py): the draft's input at
position p is (token_{p+1}, feature_p); its output h_p stands in for feature_{p+1} and
draft.logits(h_p) predicts token_{p+2}, whose true distribution is softmax(target logits at
position p + 1).

Training-time test (EAGLE-3, arXiv:2503.01840 section 3.3), written in "chain" layout: unroll
step k holds, at index s, the k-th draft step of the chain whose catch-up ran at position s:
    input (token_{s+k+1}, h^{(k-1)}_s) at position s + k  (step 0: the target's feature_s)
    attends to step-0 keys at positions <= s (the draft cache, written from true features)
           and to steps 1..k's keys at index s (its own ancestors in the chain)
    predicts token_{s+k+2}: target distribution at position s + k + 1.
This is exactly what the speculative step does at decode time (catch-up on true features,
then each tree level reads its parent's h), which tests/draft/test_train.py checks against
EagleDraft.decode.

Loss, over positions whose target distribution lies in the response (index s + 1 >= the
response start; the prompt is masked because the draft never drafts there, and the target's
distribution over user text is not what it will be asked to predict):
    sum_k w_k [ w_ce * CE(softmax(target logits), draft log-probs) + w_feat * SmoothL1(h^{(k)}, target feature) ]
        / sum_k w_k,    w_k = ttt_decay^k (EAGLE-3: 0.8^k)
  kind "eagle":  w_feat = 1, w_ce = 0.1, one step (EAGLE-1's v_w / p_w); the regression target
                 is the target's final hidden state at s + k + 1.
  kind "eagle3": w_feat = 0 (EAGLE-3 drops feature regression), w_ce = 1, five unrolled steps
                 (the default tree's depth: the catch-up plus four tree levels).
Noise: EAGLE's code adds (U[0,1) - 0.5) * 0.2 * 512 / seq_len to the features, i.e.
U(-0.1, 0.1) at 512 tokens (the paper's U(-0.1, 0.1)), shrinking for longer sequences. Here
the step-0 input features get U(-a, a) * rms(feature_p) per token with a = `noise` = 0.05:
SmolLM2's final hidden state has a per-token RMS of about 1.9, so this is EAGLE's U(-0.1, 0.1)
on this model, and being relative it means the same for EAGLE-3's fused features.

Precision: fp32 master weights for the draft, bf16 autocast on CUDA (the target itself is
bf16 there); losses in fp32. On the CPU everything is fp32.
Optimiser: AdamW (betas 0.9/0.95 as EAGLE), linear warmup then cosine to 10% of the peak,
gradient clipping by global norm. Seeded: data order from (seed, epoch), noise from its own
generator whose state is checkpointed.

Checkpoints (`out_dir/ckpt/ckpt-XXX.safetensors`, each < 15 MiB): fp32 master weights, AdamW
moments in bf16 (`moments_dtype`; fp32 resumes bit-exactly, bf16 keeps the files small
enough to carry back from the GPU: 3 files, about 42 MB, for EAGLE-3), the scheduler, the
step, the noise RNG and the metrics so far. `--resume` continues from it (or starts when
there is none). The best draft by held-out accept length goes to `draft-best.safetensors`
(bf16, about 10 MB, loadable with specc.draft.eagle.load_draft), with the training command,
data recipe and measured results in its metadata and in `summary.json`.

Accept-length proxy (`evaluate`): on held-out greedy sequences (never MT-Bench), for each
chain start s in the response, the draft's greedy chain (teacher-forced tokens, its own h
after step 0, as when drafting) is compared with the target's greedy tokens; the chain's
accepted length is the number of leading matches (at most `eval_depth`) plus one for the
bonus token: the expected tokens per target forward of a chain draft of that depth.

Batches: `batch_size` sequences in a seeded shuffle (BatchOrder), or, with `batch_tokens`, as
many similar-length sequences as fit that many padded tokens (TokenBudgetOrder): the data's
lengths spread from tens of tokens to max_len, so about half of a random batch of 16 is padding
(48% on the 2026-12-01 data), against 13% in batches of 24,576 tokens. The
target's next-token distribution is computed once per batch for every response position
(response_targets) and gathered by each unroll step. With `fit_steps_to_time`, the run times
its first steps and sets `steps` so that the cosine schedule ends with the time budget.

On the lent GPU (calls of at most 10 minutes, results only through $OUT; ../shared/GPU.md),
scripts/gpu_train.sh is one call: model install, self-distillation data at batch 256 through
the uncompiled step replayed from a CUDA graph, then a time-boxed training run from a given
head. BENCHMARKS.md records the calls behind the shipped head and what each part took. Work
lives in ~/m, which survives while the machine stays warm (30 s between calls); `--resume`
continues a run there, and the checkpoint shards (each < 15 MiB) can be carried back in to
resume on a fresh machine.
The same pieces without a GPU: `specc train-draft --plot-only --out-dir RUN` redraws the plots
from metrics.jsonl (when matplotlib was missing on the GPU machine, plots are skipped there).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from specc.draft.data import Sequences, load_sequences
from specc.draft.eagle import DraftConfig, EagleDraft, cast_parameters
from specc.models.llama import rotate_half

CKPT_MAX_BYTES = 15 * 2**20
# May differ between a run and its resumption. Changing `steps` bends the cosine schedule to
# the new end (the learning rate follows the current --steps), which is how a run is made to
# fit the device time left.
RUN_CONTROL_FIELDS = ("steps", "time_budget", "fit_steps_to_time", "eval_every", "ckpt_every", "log_every")
# fit_steps_to_time: steps timed before the schedule's end is set, and the seconds kept back
# for the last evaluation, checkpoint and plots
FIT_SKIP_STEPS, FIT_PROBE_STEPS = 10, 40
FIT_RESERVE_SECONDS = 25.0


@dataclass
class TrainConfig:
    kind: str = "eagle3"
    steps: int = 3000  # length of the schedule: training ends here
    batch_size: int = 16
    # when set: batches of similar-length sequences, as many as fit this many padded tokens
    # (TokenBudgetOrder), instead of batch_size sequences of any length
    batch_tokens: int | None = None
    max_len: int = 768
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ttt_steps: int | None = None  # None: 1 for eagle, 5 for eagle3
    ttt_decay: float = 0.8
    w_ce: float | None = None  # None: 0.1 for eagle, 1.0 for eagle3
    w_feat: float | None = None  # None: 1.0 for eagle, 0.0 for eagle3
    noise: float = 0.05
    eval_depth: int = 5
    eval_sequences: int = 128
    seed: int = 0
    # start from a saved head's weights (e.g. the best head of an earlier run whose optimiser
    # state did not come back from the GPU); a fresh optimiser and schedule
    init_from: str | None = None
    moments_dtype: str = "bf16"  # fp32: bit-exact resume; bf16: checkpoint files small enough to carry
    # run control (may change between resumed runs)
    time_budget: float | None = None
    # with time_budget: once some steps are timed (FIT_PROBE_STEPS, fewer if slow), set `steps`
    # so that the schedule ends (cosine decayed) when the budget does, not mid-schedule
    fit_steps_to_time: bool = False
    eval_every: int = 250
    ckpt_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.kind not in ("eagle", "eagle3"):
            raise ValueError(f"kind={self.kind!r}; pick 'eagle' or 'eagle3'")
        eagle3 = self.kind == "eagle3"
        if self.ttt_steps is None:
            self.ttt_steps = 5 if eagle3 else 1
        if self.w_ce is None:
            self.w_ce = 1.0 if eagle3 else 0.1
        if self.w_feat is None:
            self.w_feat = 0.0 if eagle3 else 1.0
        if eagle3 and self.w_feat:
            raise ValueError("eagle3's features live in a fused space with no regression target; keep w_feat=0")
        if self.batch_tokens is not None and self.batch_tokens < self.max_len:
            raise ValueError(f"batch_tokens={self.batch_tokens} holds less than one sequence of max_len={self.max_len}; "
                             "raise batch_tokens or lower max_len")
        if self.ttt_steps < 1 or self.steps < 0 or self.batch_size < 1 or self.max_len < 4:
            raise ValueError(f"bad config: ttt_steps={self.ttt_steps}, steps={self.steps}, "
                             f"batch_size={self.batch_size}, max_len={self.max_len}")
        if self.moments_dtype not in ("bf16", "fp32"):
            raise ValueError(f"moments_dtype={self.moments_dtype!r}; pick 'bf16' or 'fp32'")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)


# ----- the target's side ---------------------------------------------------------------------
@torch.no_grad()
def target_states(target: torch.nn.Module, input_ids: torch.Tensor, layers: Sequence[int] = ()
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run specc's reference Llama on `input_ids` [B, T] (right-padded: causal attention keeps
    the padding out of real positions) -> (final hidden = the LM head's input [B, T, H],
    [residual stream after layer i for i in layers])."""
    model = target.model
    x = model.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cos, sin = model.rotary_emb(positions, x.dtype)
    wanted, outputs = set(layers), {}
    for index, layer in enumerate(model.layers):
        x = layer(x, cos, sin)
        if index in wanted:
            outputs[index] = x
    return model.norm(x), [outputs[i] for i in layers]


# ----- the draft's side: the training-time-test unroll ----------------------------------------
def ttt_mask(length: int, step: int, device) -> torch.Tensor:
    """Step `step`'s attention over [step-0 keys | step-1 keys | ... | step-`step` keys]:
    causal over step 0 (the cache of true features), the diagonal over later steps (each chain
    sees only its own ancestors)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)


def _layer_step(draft: EagleDraft, x: torch.Tensor, positions: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
    """The draft's decoder layer on one unroll step, keys/values of earlier steps in `cache`."""
    layer = draft.layer
    attn = layer.self_attn
    b, t, _ = x.shape
    cos, sin = draft.rotary(positions, x.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    cache.append((k, v))
    groups = attn.n_heads // attn.n_kv_heads
    if step == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    else:
        keys = torch.cat([c[0] for c in cache], dim=2).repeat_interleave(groups, dim=1)
        values = torch.cat([c[1] for c in cache], dim=2).repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ttt_mask(t, step, x.device))
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def unroll(draft: EagleDraft, input_ids: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The training-time test: `steps` draft steps in chain layout (module docstring).

    input_ids [B, T]; features [B, T - 1, H], the step-0 features (fused for eagle3) of
    positions 0 .. T - 2. Returns h^{(k)} [B, T - 1, H] for k < steps; h^{(k)}[:, s] predicts
    token s + k + 2.
    """
    length = input_ids.shape[1] - 1
    padded = F.pad(input_ids, (0, steps))  # tokens past the end only feed masked positions
    base = torch.arange(length, device=input_ids.device)[None]
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    hidden, feats = [], features
    for step in range(steps):
        tokens = padded[:, step + 1: step + 1 + length]
        x = draft._input(tokens, feats)
        h = _layer_step(draft, x, base + step, cache, step)
        hidden.append(h)
        feats = h
    return hidden


def step0_features(draft: EagleDraft, final: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
    """The draft's step-0 feature input at every position, fused for eagle3 (with grad)."""
    return draft.fuse_features(layers) if draft.config.kind == "eagle3" else final


def add_feature_noise(features: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """features + U(-scale, scale) * per-token RMS (module docstring: EAGLE's U(-0.1, 0.1))."""
    if scale <= 0:
        return features
    rms = features.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.rand(features.shape, generator=generator, device=features.device, dtype=torch.float32)
    return features + ((noise * 2 - 1) * scale * rms).to(features.dtype)


# ----- batches ---------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded with 0
    lengths: torch.Tensor  # [B]
    response_start: torch.Tensor  # [B]
    tokens: int  # real tokens in the batch (counted on the host: no sync)


WIDTH_MULTIPLE = 64


def padded_width(longest: int, max_len: int) -> int:
    """A batch's width: its longest sequence rounded up to a multiple of WIDTH_MULTIPLE (at
    most max_len), so that a run sees a dozen shapes instead of hundreds: fewer allocator
    misses and kernel-selection misses on the GPU."""
    return max(longest, min(max_len, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE))


def make_batch(sequences: Sequences, indices: Sequence[int], max_len: int, device) -> Batch:
    """Right-padded batch of width padded_width(...). Padding never reaches the loss (chain_mask)."""
    rows = [sequences.tokens[i][:max_len] for i in indices]
    width = padded_width(max(len(r) for r in rows), max_len)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return Batch(ids.to(device), torch.tensor([len(r) for r in rows], device=device),
                 torch.tensor([sequences.response_start[i] for i in indices], device=device),
                 sum(len(r) for r in rows))


def chain_mask(batch: Batch, step: int) -> torch.Tensor:
    """[B, T - 1] chains s whose step-`step` target (position s + step + 1) exists and whose
    start lies in the response (s + 1 >= response start)."""
    s = torch.arange(batch.input_ids.shape[1] - 1, device=batch.input_ids.device)[None]
    return (s + 1 >= batch.response_start[:, None]) & (s + step + 1 <= batch.lengths[:, None] - 1)


def split_train_eval(sequences: Sequences, max_len: int, eval_sequences: int) -> tuple[list[int], list[int]]:
    """Held-out greedy sequences for the accept-length proxy (fixed by the data, not the seed)."""
    usable = [i for i, (t, r) in enumerate(zip(sequences.tokens, sequences.response_start))
              if r + 2 < min(len(t), max_len)]
    greedy = [i for i in usable if sequences.greedy[i]]
    count = min(eval_sequences, max(1, len(greedy) // 20)) if len(greedy) >= 2 else 0
    held = set(random.Random(20240611).sample(greedy, count))
    return [i for i in usable if i not in held], sorted(held)


class BatchOrder:
    """Batch `step` of a seeded epoch-by-epoch shuffle: a pure function of (seed, step)."""

    def __init__(self, train_indices: Sequence[int], batch_size: int, seed: int) -> None:
        if not train_indices:
            raise ValueError("no training sequences (all too short for max_len, or the data folder is empty)")
        self.indices, self.batch_size, self.seed = list(train_indices), batch_size, seed
        self._epoch, self._perm = -1, []

    def __call__(self, step: int) -> list[int]:
        out = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(g, len(self.indices))
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(len(self.indices), generator=gen).tolist()
                self._epoch = epoch
            out.append(self.indices[self._perm[pos]])
        return out


class TokenBudgetOrder:
    """Batch `step` of a seeded epoch-by-epoch shuffle whose batches hold sequences of similar
    length, as many as fit `batch_tokens` padded tokens (count x padded width): a pure function
    of (seed, step), like BatchOrder. Sorting by length within random pools of `pool`
    sequences keeps the padding small (the training data's lengths spread from tens to
    max_len tokens) while every batch still mixes sources; the batches are then shuffled."""

    def __init__(self, train_indices: Sequence[int], lengths: Sequence[int], batch_tokens: int, max_len: int,
                 seed: int, pool: int = 2048) -> None:
        if not train_indices:
            raise ValueError("no training sequences (all too short for max_len, or the data folder is empty)")
        self.indices, self.seed, self.pool = list(train_indices), seed, pool
        self.width = {i: padded_width(min(lengths[i], max_len), max_len) for i in self.indices}
        if max(self.width.values()) > batch_tokens:
            raise ValueError(f"batch_tokens={batch_tokens} holds less than one sequence of width "
                             f"{max(self.width.values())}; raise batch_tokens or lower max_len")
        self.batch_tokens = batch_tokens
        self._starts = [0]  # _starts[e]: the first step of epoch e
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        shuffled = [self.indices[i] for i in torch.randperm(len(self.indices), generator=gen).tolist()]
        batches = []
        for begin in range(0, len(shuffled), self.pool):
            batch, width = [], 0
            for index in sorted(shuffled[begin:begin + self.pool], key=lambda i: (self.width[i], i)):
                grown = max(width, self.width[index])
                if batch and grown * (len(batch) + 1) > self.batch_tokens:
                    batches.append(batch)
                    batch, grown = [], self.width[index]
                batch.append(index)
                width = grown
            batches.append(batch)
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def __call__(self, step: int) -> list[int]:
        while step >= self._starts[-1]:  # count the epochs up to `step`, keeping the last one's batches
            epoch = len(self._starts) - 1
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
            self._starts.append(self._starts[-1] + len(self._batches))
        epoch = bisect.bisect_right(self._starts, step) - 1
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[step - self._starts[epoch]]


def batch_order(sequences: Sequences, train_indices: Sequence[int], config: TrainConfig):
    """The run's batch order: TokenBudgetOrder when config.batch_tokens is set, else BatchOrder."""
    if config.batch_tokens is None:
        return BatchOrder(train_indices, config.batch_size, config.seed)
    lengths = [len(t) for t in sequences.tokens]
    return TokenBudgetOrder(train_indices, lengths, config.batch_tokens, config.max_len, config.seed)


# ----- the loss ----------------------------------------------------------------------------------
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_targets(target: torch.nn.Module, batch: Batch, final: torch.Tensor) -> dict[str, torch.Tensor]:
    """The target's next-token distribution at every position some unroll step learns from,
    computed once per batch: positions q with response_start <= q <= length - 1 (step k's
    chains s read q = s + k + 1, chain_mask). `index[b, q]` is q's row in the compact tensors
    (-1 elsewhere); `probs` [n, V] float32, `entropy` [n] and `argmax` [n]."""
    device = batch.input_ids.device
    q = torch.arange(batch.input_ids.shape[1], device=device)[None]
    wanted = (q >= batch.response_start[:, None]) & (q <= batch.lengths[:, None] - 1)
    rows, cols = wanted.nonzero(as_tuple=True)
    index = torch.full(wanted.shape, -1, dtype=torch.long, device=device)
    index[rows, cols] = torch.arange(rows.numel(), device=device)
    logp = F.linear(final[rows, cols], target.lm_head.weight).float().log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1)
    return {"index": index, "probs": probs, "entropy": entropy, "argmax": logp.argmax(-1)}


def distill_loss(target: torch.nn.Module, draft: EagleDraft, batch: Batch, config: TrainConfig,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss on one batch and its parts (detached tensors, so that logging
    them costs no host sync until they are read)."""
    device = batch.input_ids.device
    final, layers = target_states(target, batch.input_ids, draft.config.feature_layers)
    with torch.no_grad():
        targets = response_targets(target, batch, final)
    with _autocast(device):
        features = step0_features(draft, final, layers)[:, :-1]
        features = add_feature_noise(features, config.noise, generator)
        hidden = unroll(draft, batch.input_ids, features, config.ttt_steps)
    total, weight_sum, metrics = 0.0, 0.0, {}
    for step, h in enumerate(hidden):
        rows, starts = chain_mask(batch, step).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        weight = config.ttt_decay**step
        at = targets["index"][rows, starts + step + 1]  # always >= 0 under chain_mask
        target_probs = targets["probs"][at]
        with _autocast(device):
            picked = h[rows, starts]
            draft_logp = draft.logits(picked).float().log_softmax(-1)
        ce = -(target_probs * draft_logp).sum(-1).mean()
        loss = config.w_ce * ce
        metrics[f"ce_{step}"] = ce.detach()
        metrics[f"kl_{step}"] = ce.detach() - targets["entropy"][at].mean()  # the part of the CE the draft can still remove
        if config.w_feat:
            feat = F.smooth_l1_loss(picked.float(), final[rows, starts + step + 1].float())
            loss = loss + config.w_feat * feat
            metrics[f"feat_{step}"] = feat.detach()
        metrics[f"acc_{step}"] = (draft_logp.detach().argmax(-1) == targets["argmax"][at]).float().mean()
        total = total + weight * loss
        weight_sum += weight
    if weight_sum == 0:
        raise ValueError("the batch has no response positions to learn from; check response_start and max_len")
    loss = total / weight_sum
    metrics["loss"] = loss.detach()
    return loss, metrics


def chain_match_counts(draft: EagleDraft, input_ids: torch.Tensor, target_argmax: torch.Tensor,
                       hidden: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced chains on greedy text: for every chain start s, how many of its drafts
    (at most len(hidden)) match the target's greedy tokens, leading ones only -> (counts
    [B, T - 1] int64, the step-0 draft logits [B, T - 1, V] float32).

    input_ids [B, T]; target_argmax [B, T] the target's greedy next token at each position;
    hidden the unroll's h^(k) (specc.draft.train.unroll). A chain of accept length 1 + count
    is what drafting a chain at s (root token s + 1) would accept, if the text is the target's
    greedy output (true up to near-ties)."""
    device = input_ids.device
    last = target_argmax.shape[1] - 1
    ids = F.pad(input_ids, (0, len(hidden) + 2))
    s = torch.arange(input_ids.shape[1] - 1, device=device)
    run = torch.ones(input_ids.shape[0], s.numel(), dtype=torch.bool, device=device)
    count = torch.zeros(run.shape, dtype=torch.long, device=device)
    step0_logits = None
    for step, h in enumerate(hidden):
        with _autocast(device):
            logits = draft.logits(h).float()
        if step == 0:
            step0_logits = logits
        # step k drafts token s + k + 2; the target's choice there is its argmax at s + k + 1.
        # For k >= 1 the chain was fed token s + k + 1, which must be the target's choice at
        # s + k (true on greedy data, up to bf16 near-ties) for it to be the chain drafting sees.
        run = run & (logits.argmax(-1) == target_argmax[:, (s + step + 1).clamp(max=last)])
        if step > 0:
            run = run & (ids[:, s + step + 1] == target_argmax[:, (s + step).clamp(max=last)])
        count += run.long()
    return count, step0_logits


@torch.no_grad()
def evaluate(target: torch.nn.Module, draft: EagleDraft, sequences: Sequences, indices: Sequence[int],
             config: TrainConfig, batch_size: int = 8) -> dict:
    """Held-out CE and the teacher-forced chain accept length (module docstring)."""
    if not indices:
        return {}
    device = next(draft.parameters()).device
    lm_head = target.lm_head.weight
    depth = config.eval_depth
    was_training = draft.training
    draft.eval()
    accepted_total, chains = 0.0, 0
    reached = torch.zeros(depth + 1, dtype=torch.float64)  # chains whose first d drafts all matched
    ce_sum, ce_count = 0.0, 0
    for begin in range(0, len(indices), batch_size):
        batch = make_batch(sequences, indices[begin:begin + batch_size], config.max_len, device)
        final, layers = target_states(target, batch.input_ids, draft.config.feature_layers)
        target_argmax = F.linear(final, lm_head).argmax(-1)  # [B, T]: the target's greedy next tokens
        with _autocast(device):
            hidden = unroll(draft, batch.input_ids, step0_features(draft, final, layers)[:, :-1], depth)
        count, logits = chain_match_counts(draft, batch.input_ids, target_argmax, hidden)
        rows, starts = chain_mask(batch, 0).nonzero(as_tuple=True)
        target_logits = F.linear(final[rows, starts + 1], lm_head).float()
        ce_sum += -(target_logits.softmax(-1) * logits[rows, starts].log_softmax(-1)).sum().item()
        ce_count += rows.numel()
        count = count[chain_mask(batch, depth - 1)]  # whole chains only
        accepted_total += (count + 1).sum().item()
        chains += count.numel()
        for d in range(depth + 1):
            reached[d] += (count >= d).sum().item()
    if was_training:
        draft.train()
    # P(draft d is right | drafts 1 .. d-1 were); None where no chain got that far
    rates = [(reached[d] / reached[d - 1]).item() if reached[d - 1] > 0 else None for d in range(1, depth + 1)]
    return {
        "accept_length": accepted_total / chains if chains else float("nan"),
        "accept_rate_by_depth": rates,
        "eval_ce": ce_sum / ce_count if ce_count else float("nan"),
        "eval_chains": chains,
    }


# ----- schedule, checkpoints ------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(draft: EagleDraft, config: TrainConfig):
    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps, config.min_lr_ratio))
    return optimizer, scheduler


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def save_checkpoint(folder: str | Path, draft: EagleDraft, optimizer, scheduler, state: dict,
                    generator: torch.Generator | None, moments_dtype: str = "bf16",
                    max_bytes: int = CKPT_MAX_BYTES) -> list[Path]:
    """Write the training state as safetensors shards of at most `max_bytes` each; the small
    state (step, config, scheduler, metrics) rides in the first shard's metadata. The folder
    is replaced whole, so an interrupted save leaves the previous checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in draft.named_parameters():
        tensors[f"param/{name}"] = param.detach().float().cpu().contiguous()
    optim_state = optimizer.state_dict()
    optim_steps = {}
    for index, slot in optim_state["state"].items():
        for key, value in slot.items():
            if key == "step":
                optim_steps[str(index)] = float(value)
            else:
                tensors[f"optim/{index}/{key}"] = value.detach().to(_DTYPES[moments_dtype]).cpu().contiguous()
    if generator is not None:
        tensors["rng/noise"] = generator.get_state().cpu()
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    meta = {
        "state": json.dumps(state),
        "optimizer_groups": json.dumps(optim_state["param_groups"]),
        "optimizer_steps": json.dumps(optim_steps),
        "scheduler": json.dumps(scheduler.state_dict()),
        "draft_config": draft.config.to_json(),
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    budget = max_bytes - 2**20  # room for the header and the metadata
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if nbytes > budget:
            raise ValueError(f"tensor {name} has {nbytes} bytes, more than a checkpoint shard of {max_bytes} holds")
        if size + nbytes > budget and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    paths = []
    for index, shard in enumerate(shards):
        path = tmp / f"ckpt-{index:03d}.safetensors"
        save_file(shard, str(path), metadata={"shard": str(index), "shards": str(len(shards)),
                                              **(meta if index == 0 else {})})
        paths.append(folder / path.name)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return paths


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    folder = Path(folder)
    paths = sorted(folder.glob("ckpt-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    tensors, meta = {}, {}
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            shard_meta = handle.metadata() or {}
            if int(shard_meta.get("shards", -1)) != len(paths):
                raise ValueError(f"{folder} holds {len(paths)} shards but {path.name} says {shard_meta.get('shards')}; "
                                 "the checkpoint is incomplete: copy all ckpt-*.safetensors files")
            if shard_meta.get("shard") == "0":
                meta = shard_meta
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors, meta


def load_checkpoint(folder: str | Path, draft: EagleDraft, optimizer, scheduler,
                    generator: torch.Generator | None) -> dict:
    """Restore what save_checkpoint wrote into the given objects; returns the saved state."""
    tensors, meta = read_checkpoint(folder)
    saved_config = DraftConfig.from_json(meta["draft_config"])
    if saved_config != draft.config:
        raise ValueError(f"the checkpoint in {folder} is for {saved_config}, not {draft.config}; "
                         "use another --out-dir or the same --kind")
    with torch.no_grad():
        for name, param in draft.named_parameters():
            param.copy_(tensors[f"param/{name}"].to(param.dtype))
    params = list(draft.parameters())
    steps = json.loads(meta["optimizer_steps"])
    state = {}
    for index_text, step in steps.items():
        index = int(index_text)
        slot = {"step": torch.tensor(step)}
        for key in ("exp_avg", "exp_avg_sq"):
            slot[key] = tensors[f"optim/{index}/{key}"].to(device=params[index].device, dtype=params[index].dtype)
        state[index] = slot
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optimizer_groups"])})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    if generator is not None and "rng/noise" in tensors:
        generator.set_state(tensors["rng/noise"])
    torch.set_rng_state(tensors["rng/torch_cpu"])
    return json.loads(meta["state"])


def export_draft(draft: EagleDraft, path: str | Path, metadata: dict[str, str] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the draft's own weights in `dtype` (bf16: ~10 MB), loadable with load_draft."""
    export = EagleDraft(draft.config)
    export.load_state_dict({k: v.detach().cpu() for k, v in draft.state_dict().items()})
    cast_parameters(export, dtype)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    export.save(tmp, metadata)
    tmp.replace(path)
    return path


# ----- plots -------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (train loss and per-step CE) and accept_length.png from metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed here; run `specc train-draft --plot-only --out-dir ...` where it is",
              file=sys.stderr)
        return []
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="train loss", color="black", linewidth=1.2)
        for key in sorted({k for r in train for k in r if k.startswith("ce_")}, key=lambda k: int(k[3:])):
            ax.plot(steps, [r.get(key, float("nan")) for r in train], label=f"train CE step {key[3:]}", linewidth=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_ce"] for r in evals], "o-", label="held-out CE step 0", color="red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("EAGLE draft distillation: loss")
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if evals:
        ax.plot([r["step"] for r in evals], [r["accept_length"] for r in evals], "o-", color="tab:blue",
                label=f"accept length proxy (chain depth {evals[-1].get('depth', '?')}, bonus included)")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens per target forward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held-out teacher-forced chain acceptance")
    fig.tight_layout()
    paths.append(out_dir / "accept_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ----- the loop ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    finished: bool
    best_accept_length: float
    last_eval: dict
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)


def profile_steps(target: torch.nn.Module, data_dir: str | Path, config: TrainConfig, steps: int = 5,
                  warmup: int = 3, rows: int = 25, sequences: Sequences | None = None) -> str:
    """Time `steps` training steps (after `warmup`) under torch.profiler and return its table of
    the most expensive ops: where a slow training step spends its time, on the GPU or the CPU."""
    from torch.profiler import ProfilerActivity, profile

    device = next(target.parameters()).device
    target.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    draft = EagleDraft(DraftConfig.for_target(target.config, config.kind)).to(device).attach_to(target)
    optimizer, _ = make_optimizer(draft, config)
    sequences = sequences if sequences is not None else load_sequences(data_dir)
    train_idx, _ = split_train_eval(sequences, config.max_len, config.eval_sequences)
    order = batch_order(sequences, train_idx, config)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    def one_step(step: int) -> None:
        batch = make_batch(sequences, order(step), config.max_len, device)
        loss, _ = distill_loss(target, draft, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for step in range(warmup):
        one_step(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for step in range(warmup, warmup + steps):
            one_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return (f"{steps} steps in {seconds:.3f} s ({steps / seconds:.2f} steps/s, profiler on) on {device}\n"
            + prof.key_averages().table(sort_by=sort, row_limit=rows))


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train-draft", mininterval=1.0 if sys.stderr.isatty() else 20.0)


def _data_recipe(data_dir: Path) -> list[dict]:
    recipes = []
    for path in sorted(data_dir.glob("recipe-*.json")):
        recipe = json.loads(path.read_text())
        recipes.append({k: recipe[k] for k in ("n_prompts", "seed", "max_new_tokens", "greedy_fraction", "temperature",
                                              "counts_kept", "dropped_mt_bench", "sequences", "response_tokens")
                        if k in recipe})
    return recipes


def _init_weights(draft: EagleDraft, path: str | Path) -> None:
    """Copy a saved head's weights (any dtype) into `draft`'s fp32 master weights."""
    from specc.draft.eagle import load_draft

    saved = load_draft(path)
    if saved.config != draft.config:
        raise ValueError(f"--init-from {path}: its config {saved.config} differs from this run's {draft.config}; "
                         "train the same --kind for the same target")
    with torch.no_grad():
        for name, param in draft.named_parameters():
            param.copy_(dict(saved.named_parameters())[name].float())


def train(
    target: torch.nn.Module,
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    command: str = "",
    sequences: Sequences | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume training) a draft head for `target` on the sequences in `data_dir`."""
    start_time = time.monotonic()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "ckpt"
    metrics_path = out_dir / "metrics.jsonl"
    device = next(target.parameters()).device
    target.eval().requires_grad_(False)

    if resume and (ckpt_dir / "ckpt-000.safetensors").exists():
        _, meta = read_checkpoint(ckpt_dir)
        saved = json.loads(meta["state"])["config"]
        run_control = {k: getattr(config, k) for k in RUN_CONTROL_FIELDS if hasattr(config, k)}
        changed = {k: (saved[k], getattr(config, k)) for k in saved
                   if k not in run_control and saved[k] != getattr(config, k) and k != "betas"}
        if changed:
            log(f"resuming with the checkpoint's settings; ignoring {changed} (saved, given)")
        config = replace(TrainConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                                        if k in {f.name for f in fields(TrainConfig)}}), **run_control)
    else:
        resume = False

    torch.manual_seed(config.seed)
    draft_config = DraftConfig.for_target(target.config, config.kind)
    draft = EagleDraft(draft_config).to(device)  # fp32 master weights
    if config.init_from and not resume:
        _init_weights(draft, config.init_from)
        log(f"initialised the draft from {config.init_from}")
    draft.attach_to(target)
    draft.train()
    optimizer, scheduler = make_optimizer(draft, config)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    sequences = sequences if sequences is not None else load_sequences(data_dir)
    train_idx, eval_idx = split_train_eval(sequences, config.max_len, config.eval_sequences)
    order = batch_order(sequences, train_idx, config)
    recipe = _data_recipe(data_dir)

    state = {"step": 0, "best_accept_length": -1.0, "best_step": -1, "tokens_seen": 0, "train_seconds": 0.0}
    if resume:
        state.update(load_checkpoint(ckpt_dir, draft, optimizer, scheduler, generator))
        # the checkpoint's copy of the metrics is the truth: records written after it (a run
        # killed between a log line and its checkpoint) would repeat
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state.get("metrics", [])))
        log(f"resumed from {ckpt_dir} at step {state['step']}")
    state.pop("metrics", None)
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    log(f"draft {config.kind}: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters; "
        f"{len(train_idx)} training / {len(eval_idx)} held-out sequences; device {device}")

    def record(entry: dict) -> None:
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def summary(finished: bool, last_eval: dict) -> dict:
        return {
            "finished": finished, "step": state["step"], "steps": config.steps, "kind": config.kind,
            "best_accept_length": state["best_accept_length"], "best_step": state["best_step"],
            "last_eval": last_eval, "tokens_seen": state["tokens_seen"], "train_seconds": round(state["train_seconds"], 1),
            "config": config.to_dict(), "command": command, "data_recipe": recipe, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "draft_parameters": sum(p.numel() for p in draft.parameters()),
        }

    def run_eval() -> dict:
        result = evaluate(target, draft, sequences, eval_idx, config)
        if not result:
            return result
        entry = {"kind": "eval", "step": state["step"], "depth": config.eval_depth, **result}
        record(entry)
        rates = [None if r is None else round(r, 3) for r in result["accept_rate_by_depth"]]
        log(f"step {state['step']}: held-out accept length {result['accept_length']:.3f} "
            f"(acceptance by depth {rates}), CE {result['eval_ce']:.3f}")
        if result["accept_length"] > state["best_accept_length"]:
            state["best_accept_length"], state["best_step"] = result["accept_length"], state["step"]
            export_draft(draft, out_dir / "draft-best.safetensors", {
                "specc_training": json.dumps(summary(False, entry)), "specc_draft_kind": config.kind,
            })
        return entry

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, draft, optimizer, scheduler,
                        {**state, "config": config.to_dict(), "metrics": read_metrics(metrics_path)},
                        generator, config.moments_dtype)

    bar = _progress_bar(config.steps, state["step"], progress)
    last_eval: dict = {}
    stopped_for_time = False
    chunk_start, chunk_step0 = time.monotonic(), state["step"]
    window: dict[str, float] = {}
    window_count = 0
    fitted, probe_start = False, 0.0
    while state["step"] < config.steps:
        batch = make_batch(sequences, order(state["step"]), config.max_len, device)
        loss, parts = distill_loss(target, draft, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(draft.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["tokens_seen"] += batch.tokens
        for key, value in {**parts, "grad_norm": grad_norm.detach()}.items():
            window[key] = window[key] + value if key in window else value
        window_count += 1
        if bar is not None:
            bar.update(1)
        if state["step"] % config.log_every == 0 or state["step"] == config.steps:
            means = {k: float(v) / window_count for k, v in window.items()}
            elapsed = time.monotonic() - chunk_start
            record({"kind": "train", "step": state["step"], "lr": scheduler.get_last_lr()[0], **means,
                    "steps_per_second": (state["step"] - chunk_step0) / max(elapsed, 1e-9),
                    "tokens_seen": state["tokens_seen"]})
            if bar is not None:
                bar.set_postfix(loss=f"{means['loss']:.3f}", acc0=f"{means.get('acc_0', float('nan')):.3f}")
            window, window_count = {}, 0
        if config.fit_steps_to_time and config.time_budget is not None and not fitted:
            # the first steps (allocator growth, kernel selection) are slower: time the next
            # FIT_PROBE_STEPS, or as many as a fifth of the budget allows when steps are slow
            done = state["step"] - chunk_step0
            if done == FIT_SKIP_STEPS:
                probe_start = time.monotonic()
            elif done >= FIT_SKIP_STEPS + FIT_PROBE_STEPS or (
                    done > FIT_SKIP_STEPS + 1 and time.monotonic() - start_time > 0.2 * config.time_budget):
                fitted = True
                rate = (done - FIT_SKIP_STEPS) / max(time.monotonic() - probe_start, 1e-9)
                left = config.time_budget - (time.monotonic() - start_time) - FIT_RESERVE_SECONDS
                config.steps = state["step"] + max(1, int(0.95 * rate * max(left, 0.0)))
                log(f"{rate:.2f} steps/s over {done - FIT_SKIP_STEPS} steps: the schedule now ends at step {config.steps}")
                if bar is not None:
                    bar.total = config.steps
        out_of_time = config.time_budget is not None and time.monotonic() - start_time > config.time_budget
        if state["step"] % config.eval_every == 0 or state["step"] == config.steps or out_of_time:
            last_eval = run_eval()
        if out_of_time or state["step"] % config.ckpt_every == 0 or state["step"] == config.steps:
            state["train_seconds"] += time.monotonic() - chunk_start
            chunk_start, chunk_step0 = time.monotonic(), state["step"]
            checkpoint()
        if out_of_time and state["step"] < config.steps:
            stopped_for_time = True
            break
    if bar is not None:
        bar.close()
    if not last_eval or last_eval.get("step") != state["step"]:
        last_eval = run_eval()
        state["train_seconds"] += time.monotonic() - chunk_start
        checkpoint()
    finished = state["step"] >= config.steps
    (out_dir / "summary.json").write_text(json.dumps(summary(finished, last_eval), indent=1))
    plot_metrics(metrics_path, out_dir)
    rate = read_metrics(metrics_path)
    speed = [r["steps_per_second"] for r in rate if r.get("kind") == "train"]
    log(f"{'finished' if finished else 'paused (time budget)'} at step {state['step']}/{config.steps}; "
        f"best held-out accept length {state['best_accept_length']:.3f} at step {state['best_step']}; "
        f"{speed[-1] if speed else float('nan'):.2f} steps/s"
        + ("; run again with --resume to continue" if stopped_for_time else ""))
    return TrainResult(state["step"], finished, state["best_accept_length"], last_eval, out_dir, read_metrics(metrics_path))
