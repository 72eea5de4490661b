"""`specc bench spec`: speculative against plain decoding of the real model, end to end.

One run measures, side by side on the same prompts (MT-Bench first turns by default, or any
JSONL with `turns`), greedy or sampled:
  - HF `generate` (eager), batch 1, on the first `hf_prompts` prompts;
  - specc's plain compiled decode, at every batch size;
  - specc's speculative decode with each tree, at every batch size, with the draft head and
    (with `untrained=True`) with an untrained head of the same shape swapped into the same
    compiled engines.
Per configuration: tokens/s, decode-only tokens/s, ms per output token, mean accept length,
the accept-length histogram, compile + warm-up seconds and, for speculative runs, how many
outputs equal plain decode's at the same batch size (greedy) and, for the first few that
differ, the first divergent token with the target's top-2 logit margin there. Ratios: speculative
over plain per tree and batch size, and every specc configuration over HF on HF's prompts.

Method, so that the decoders do the same work and nothing but decoding is timed:
  - stop tokens are ignored (stop_ids=()): every sequence gets exactly max_new_tokens tokens.
    What follows the model's end of turn is text no chat user sees (and no draft was trained
    on), so each configuration also reports `mean_accept_length_until_eos`: over the steps up
    to the one that emitted the first stop token (all steps where there is none);
  - one cache length for every engine (the longest prompt plus the budget plus the slack the
    deepest tree needs, rounded up to 256), so each engine compiles once;
  - a short warm-up call per engine (same engine key) before timing;
  - batch b runs the prompts in consecutive groups of b; the last group is padded by
    repeating prompts, and the padded rows are dropped from every metric. Each real row is
    charged its group's seconds / b, so tokens/s at batch b is the groups' throughput.

Tree lists: "dynamic:8,8,64" holds commas, so the command line separates trees with ";"
(`--trees "eagle;chain:6;dynamic:8,8,64"`) or takes `--tree` once per tree. A tree name may end
in "@K" (`tuned:64,6@8192`): that tree with the head proposing from its draft vocabulary of K
tokens (specc/draft/vocab.py; the head file must carry its token counts), side by side with
the same tree over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

import specc
from specc.bench.common import WeightsWatch, environment, first_divergence, hf_greedy, mt_bench_first_turns
from specc.draft import SHIPPED_HEAD_TREES
from specc.generate import cache_positions_needed, tree_plan

# the shipped head's batch-1 tree (what `specc generate` uses), then one of each other kind
DEFAULT_TREES = (SHIPPED_HEAD_TREES[1], "eagle", "chain:6", "dynamic:8,8,64")
TREE_SEPARATOR = ";"
WARMUP_TOKENS = 16
DIVERGENCES_SHOWN = 3
SAMPLED_NOTE = (
    "sampled decoding: lossless speculative sampling keeps the target's distribution, not plain "
    "decode's random stream, so tokens are not compared with the plain output; compare the "
    "decoders by accept length (and tokens/s) only"
)


# ----- options -------------------------------------------------------------------------------
def parse_trees(text: str) -> list[str]:
    """`"eagle;chain:6;dynamic:8,8,64"` -> the tree strings, each checked by specc's parser."""
    trees = [t.strip() for t in text.split(TREE_SEPARATOR) if t.strip()]
    if not trees:
        raise ValueError(f"no tree in {text!r}; give trees separated by {TREE_SEPARATOR!r}, e.g. 'eagle;chain:6'")
    for tree in trees:
        _check_tree(tree)
    return trees


DRAFT_VOCAB_MARK = "@"  # "tuned:64,6@8192": that tree, the draft proposing from its top 8192 tokens


def split_draft_vocab(tree):
    """`"eagle@8192"` -> ("eagle", 8192); a tree without the mark -> (tree, None)."""
    if isinstance(tree, str) and DRAFT_VOCAB_MARK in tree:
        name, _, size = tree.rpartition(DRAFT_VOCAB_MARK)
        try:
            value = int(size)
        except ValueError:
            raise ValueError(f"tree {tree!r}: the draft vocabulary after {DRAFT_VOCAB_MARK!r} is a token count, "
                             f"e.g. 'eagle@8192' (0: the whole vocabulary)") from None
        if value < 0:
            raise ValueError(f"tree {tree!r}: a draft vocabulary of {value} tokens")
        return name, value
    return tree, None


def _check_tree(tree) -> None:
    try:
        tree = split_draft_vocab(tree)[0]
        tree_plan(tree)
    except (ValueError, TypeError) as error:
        mixed = isinstance(tree, str) and "," in tree and not tree.startswith("dynamic")
        hint = " (separate trees with ';', not ',')" if mixed else ""
        raise ValueError(f"tree {tree!r} is not a valid tree{hint}: {error}") from error


def parse_batch_sizes(text: str) -> list[int]:
    """`"1,4,16"` -> [1, 4, 16]."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"batch sizes {text!r} are not comma-separated integers, e.g. '1,4,16'") from error
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes {text!r}: give one or more sizes >= 1, e.g. '1,4,16'")
    return sizes


def load_prompts(tokenizer, prompt_file: str | Path | None = None,
                 n_prompts: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """Rows of the prompt file (MT-Bench first turns by default) and their ChatML token ids."""
    rows = mt_bench_first_turns(prompt_file, limit=n_prompts)
    if not rows:
        raise ValueError(f"no prompts in {prompt_file or 'MT-Bench'}; give a JSONL file with a `turns` list per line")
    return rows, [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]


# ----- draft heads ---------------------------------------------------------------------------
def _default_draft_path() -> Path | None:
    """The shipped head, if this build has one (specc.draft.default_draft_path)."""
    try:
        from specc.draft import default_draft_path
    except ImportError:
        return None
    path = default_draft_path()
    return Path(path) if path is not None and Path(path).exists() else None


def _untrained_head(model: torch.nn.Module, seed: int):
    from specc.draft.eagle import DraftConfig, EagleDraft, cast_parameters
    from specc.models.llama import LlamaConfig

    if not isinstance(model.config, LlamaConfig):
        raise TypeError(
            f"no draft given and the target's config is a {type(model.config).__name__}; build the draft's config "
            "from a specc LlamaConfig, or pass draft= (an EagleDraft or a .safetensors path)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = EagleDraft(DraftConfig.for_target(model.config))
    param = next(model.parameters())
    return cast_parameters(draft, param.dtype, param.device).attach_to(model).eval()


def resolve_draft(draft, model: torch.nn.Module, seed: int = 0) -> tuple[object, dict]:
    """The draft to measure and what it is: an object is used as given, a path is loaded, None
    means the shipped head; without one, an untrained head stands in and the report says so."""
    if draft is not None and not isinstance(draft, (str, Path)):
        return draft, {"source": f"{type(draft).__name__} passed to run()", "trained": True, "note": None}
    path = Path(draft) if draft is not None else _default_draft_path()
    if path is not None:
        from specc.draft.eagle import load_draft

        return load_draft(path, model), {"source": str(path), "trained": True, "note": None}
    note = ("NO TRAINED DRAFT HEAD: specc.draft.default_draft_path() found none and no --draft was given; an "
            f"UNTRAINED random-init head (seed {seed}) was measured, so accept lengths and speedups say nothing "
            "about a trained EAGLE head")
    return _untrained_head(model, seed), {"source": "untrained random init", "trained": False, "note": note}


def untrained_weights(draft, seed: int) -> dict[str, torch.Tensor]:
    """A seeded random-init head of the draft's config, as tensors shaped, typed and placed like
    the draft's parameters (for `swapped_weights`)."""
    from specc.draft.eagle import EagleDraft

    if not isinstance(draft, EagleDraft):
        raise TypeError(f"the untrained comparison needs an EagleDraft; the draft is a {type(draft).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = dict(EagleDraft(draft.config).named_parameters())
    return {name: fresh[name].detach().to(p.dtype).to(p.device) for name, p in draft.named_parameters()}


@contextmanager
def swapped_weights(draft: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Copy `weights` into the draft's parameters in place, and restore them bit-exactly after.

    In place (p.copy_), because the compiled steps and their CUDA graphs read the parameters by
    address: the same engines then run the other head with no recompile."""
    params = dict(draft.named_parameters())
    if set(weights) != set(params):
        raise ValueError(f"weights for {sorted(set(weights) ^ set(params))} do not match the draft's parameters")
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


# ----- measuring -----------------------------------------------------------------------------
def batch_groups(n_prompts: int, batch: int) -> list[list[tuple[int, bool]]]:
    """Consecutive groups of `batch` prompt indices, each flagged real; the last group is
    padded by repeating prompts from the start (flagged False)."""
    groups = []
    for start in range(0, n_prompts, batch):
        group = [(i, True) for i in range(start, min(start + batch, n_prompts))]
        group += [((start + j) % n_prompts, False) for j in range(len(group), batch)]
        groups.append(group)
    return groups


def _sync(model: torch.nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def _progress(items, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


class _Bench:
    """The fixed settings of one run, shared by every configuration it measures."""

    def __init__(self, model, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, max_seq_len, compile,
                 progress, stop_id=None) -> None:
        self.model, self.prompts, self.stop_id = model, prompts, stop_id
        self.max_new_tokens, self.max_seq_len, self.compile = max_new_tokens, max_seq_len, compile
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.greedy = temperature == 0
        self.seed, self.progress = seed, progress
        self.started = time.perf_counter()

    def generate(self, compiled, indices: list[int], max_new_tokens: int):
        # one seed per prompt, so a prompt draws the same stream whatever its batch or row
        return specc.generate(compiled, [self.prompts[i] for i in indices], max_new_tokens=max_new_tokens,
                              seed=[self.seed + i for i in indices], stop_ids=(), max_seq_len=self.max_seq_len,
                              compile=self.compile, **self.sampling)

    def measure(self, compiled, name: dict, batch: int, warm_up: bool, n_prompts: int | None = None) -> dict:
        """One configuration over every prompt (or the first `n_prompts`): per-prompt numbers
        and their aggregate."""
        groups = batch_groups(min(n_prompts or len(self.prompts), len(self.prompts)), batch)
        warmup_seconds = None
        if warm_up:
            # every group once, briefly: compiles the step and JIT-compiles the kernels of every
            # prompt length (the prefill's kernels specialise on length buckets), so that no
            # timed prompt pays for a compilation that an earlier configuration happened to do
            start = time.perf_counter()
            for group in groups:
                self.generate(compiled, [i for i, _ in group], min(WARMUP_TOKENS, self.max_new_tokens))
            warmup_seconds = time.perf_counter() - start
        rows = []
        for number, group in enumerate(_progress(groups, _label({**name, "batch": batch}), self.progress)):
            out = self.generate(compiled, [i for i, _ in group], self.max_new_tokens)
            for (index, real), tokens, accepts in zip(group, out.tokens, out.accept_lengths_by_sequence()):
                if real:
                    rows.append({"index": index, "group": number, "new_tokens": len(tokens), "tokens": tokens,
                                 "accept_lengths": accepts,
                                 "seconds": (out.prefill_seconds + out.decode_seconds) / batch,
                                 "decode_seconds": out.decode_seconds / batch,
                                 "group_decode_seconds": out.decode_seconds,
                                 "group_steps_launched": out.steps_launched,
                                 "group_steps_used": max(out.sequence_steps, default=0)})
        return {**name, "batch": batch, "compile_and_warmup_seconds": warmup_seconds, **aggregate(rows, self.stop_id),
                "per_prompt": rows}

    def hf(self, hf_model, indices: list[int]) -> dict:
        """HF `generate` (eager), batch 1, exactly max_new_tokens per prompt."""
        warmup_tokens = min(WARMUP_TOKENS, self.max_new_tokens)
        hf_generate(hf_model, self.prompts[indices[0]], warmup_tokens, self.sampling, self.seed)
        rows = []
        for index in _progress(indices, "HF eager generate", self.progress):
            _sync(hf_model)
            start = time.perf_counter()
            tokens = hf_generate(hf_model, self.prompts[index], self.max_new_tokens, self.sampling, self.seed + index)
            _sync(hf_model)
            rows.append({"index": index, "new_tokens": len(tokens), "tokens": tokens,
                         "seconds": time.perf_counter() - start})
        seconds = sum(r["seconds"] for r in rows)
        new_tokens = sum(r["new_tokens"] for r in rows)
        return {"decoder": "hf", "tree": None, "head": None, "batch": 1, "compile_and_warmup_seconds": None,
                "new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds,
                "decode_tokens_per_second": None, "ms_per_output_token": 1e3 * seconds / new_tokens,
                "mean_accept_length": None, "accept_length_histogram": None, "per_prompt": rows}

    def report_line(self, config: dict) -> str:
        elapsed = time.perf_counter() - self.started
        line = f"[{elapsed:8.1f}s] {_label(config)}: {config['tokens_per_second']:.1f} tokens/s"
        if config.get("mean_accept_length") is not None:
            line += f", accept {config['mean_accept_length']:.2f}"
        if config.get("steps_launched") is not None:
            line += f", {config['steps_launched'] - config['steps_used']} of {config['steps_launched']} steps unused"
        if config.get("equal_to_plain") is not None:
            line += f", {config['equal_to_plain']}/{config['compared']} equal to plain"
        if config.get("compile_and_warmup_seconds") is not None:
            line += f", compile+warm-up {config['compile_and_warmup_seconds']:.1f}s"
        if config.get("weights_changed"):
            line += f", WEIGHTS CHANGED ({len(config['weights_changed'])} tensors)"
        return line


def hf_generate(hf_model, prompt: list[int], max_new_tokens: int, sampling: dict, seed: int) -> list[int]:
    """HF `generate`, greedy or sampled with specc's temperature / top-k / top-p, exactly
    max_new_tokens new tokens (min_new_tokens suppresses EOS, as specc here ignores it)."""
    if sampling["temperature"] == 0:
        return hf_greedy(hf_model, prompt, max_new_tokens)
    torch.manual_seed(seed)
    ids = torch.tensor([prompt], device=next(hf_model.parameters()).device)
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, do_sample=True, **sampling)
    return out[0, len(prompt):].tolist()


def steps_until_stop(tokens: Sequence[int], accept_lengths: Sequence[int], stop_id: int | None) -> list[int]:
    """The accept lengths of the steps up to and including the one that emitted the first
    `stop_id` (tokens[0] came from prefill, step j emitted the next accept_lengths[j]); all of
    them when the stop token never came."""
    if stop_id is None or stop_id not in tokens:
        return list(accept_lengths)
    stop_at, emitted, kept = tokens.index(stop_id), 1, []
    for length in accept_lengths:
        if emitted > stop_at:
            break
        kept.append(length)
        emitted += length
    return kept


def aggregate(rows: list[dict], stop_id: int | None = None) -> dict:
    """A configuration's numbers from its real rows (see the module docstring for the charging).

    decode tokens are those the steps emitted (the first token of each sequence comes from
    prefill); ms per output token is a sequence's decode time per decode token. The histogram
    counts every step, so each sequence's last step, cut short by the budget, is in it too.
    `mean_accept_length_until_eos` counts only the steps up to each row's first `stop_id`."""
    new_tokens = sum(r["new_tokens"] for r in rows)
    decode_tokens = sum(sum(r["accept_lengths"]) for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    decode_seconds = sum(r["decode_seconds"] for r in rows)
    lengths = [length for r in rows for length in r["accept_lengths"]]
    histogram = [0] * (max(lengths, default=0) + 1)
    for length in lengths:
        histogram[length] += 1
    until_stop = [length for r in rows for length in steps_until_stop(r["tokens"], r["accept_lengths"], stop_id)]
    # per group: the steps the loop launched, and those its longest-running row used
    launched = {r["group"]: r["group_steps_launched"] for r in rows if "group_steps_launched" in r}
    used = {r["group"]: r["group_steps_used"] for r in rows if "group_steps_used" in r}
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": _ratio(new_tokens, seconds),
        "decode_tokens_per_second": _ratio(decode_tokens, decode_seconds),
        "ms_per_output_token": _ratio(1e3 * sum(r["group_decode_seconds"] for r in rows), decode_tokens),
        "mean_accept_length": _ratio(sum(lengths), len(lengths)),
        "mean_accept_length_until_eos": _ratio(sum(until_stop), len(until_stop)),
        "accept_length_histogram": histogram,  # [k] = steps that emitted k tokens
        # target forwards run, and those whose tokens were kept (the rest came past the budget)
        "steps_launched": sum(launched.values()) if launched else None,
        "steps_used": sum(used.values()) if used else None,
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def subset_tokens_per_second(config: dict, indices: set[int]) -> float | None:
    """tokens/s of a configuration over some prompts only (each row's charged seconds)."""
    rows = [r for r in config["per_prompt"] if r["index"] in indices]
    return _ratio(sum(r["new_tokens"] for r in rows), sum(r["seconds"] for r in rows))


def compare_with_plain(config: dict, plain: dict, model, prompts: list[list[int]], greedy: bool) -> None:
    """Mark each speculative row equal or not to plain decode's row at the same batch size (the
    same batch shapes, so bf16 reductions differ least); for the first few that differ, where and
    how close the target's top two logits were (bf16 near-ties explain such differences)."""
    if not greedy:
        config.update(equal_to_plain=None, compared=0, divergences=[])
        return
    reference = {r["index"]: r["tokens"] for r in plain["per_prompt"]}
    divergences = []
    for row in config["per_prompt"]:
        row["equal_to_plain"] = row["tokens"] == reference[row["index"]]
        if not row["equal_to_plain"] and len(divergences) < DIVERGENCES_SHOWN:
            found = first_divergence(model, prompts[row["index"]], row["tokens"], reference[row["index"]])
            divergences.append({"prompt_index": row["index"], **(found or {"index": None})})
    config.update(equal_to_plain=sum(r["equal_to_plain"] for r in config["per_prompt"]),
                  compared=len(config["per_prompt"]), divergences=divergences)


def ratios(configs: list[dict], hf_indices: list[int], stop_id: int | None = None) -> dict:
    """Speculative over plain (same batch size), and every specc configuration over HF eager
    measured on HF's prompts (each configuration's tokens/s recomputed on that subset)."""
    plain = {c["batch"]: c for c in configs if c["decoder"] == "plain"}

    def reference(c: dict) -> dict:
        # a configuration measured on fewer prompts (--untrained-prompts) is set against plain
        # decode on those same prompts
        base = plain[c["batch"]]
        indices = {r["index"] for r in c["per_prompt"]}
        if indices == {r["index"] for r in base["per_prompt"]}:
            return base
        return aggregate([r for r in base["per_prompt"] if r["index"] in indices], stop_id)

    over_plain = [
        {"tree": c["tree"], "head": c["head"], "batch": c["batch"], "prompts": len(c["per_prompt"]),
         **{key: _ratio(c[key], reference(c)[key]) for key in ("tokens_per_second", "decode_tokens_per_second")}}
        for c in configs if c["decoder"] == "spec"
    ]
    hf = next((c for c in configs if c["decoder"] == "hf"), None)
    over_hf = []
    if hf is not None:
        subset = set(hf_indices)
        for c in configs:
            if c["decoder"] != "hf":
                tps = subset_tokens_per_second(c, subset)
                over_hf.append({"decoder": c["decoder"], "tree": c["tree"], "head": c["head"], "batch": c["batch"],
                                "tokens_per_second_on_hf_prompts": tps,
                                "tokens_per_second": _ratio(tps, hf["tokens_per_second"])})
    return {"spec_over_plain": over_plain, "over_hf_eager": over_hf}


def _label(config: dict) -> str:
    if config["decoder"] == "hf":
        return "HF eager b=1"
    if config["decoder"] == "plain":
        return f"plain b={config.get('batch', '?')}"
    return f"spec {config['tree']} {config['head']} b={config.get('batch', '?')}"


def _save(report: dict, out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))


# ----- the run -------------------------------------------------------------------------------
def run(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    prompt_file: str | Path | None = None,
    n_prompts: int | None = None,
    draft=None,
    trees: Sequence = DEFAULT_TREES,
    batch_sizes: Sequence[int] = (1,),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    hf_model: torch.nn.Module | None = None,
    hf_prompts: int = 8,
    untrained: bool = False,
    untrained_prompts: int | None = None,
    compile: bool = True,
    out: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
    stop_id: int | None = None,
) -> dict:
    """Measure HF eager, specc plain and specc speculative decode (module docstring) on an
    already-loaded target `model` and return the report (also written to `out` as it grows,
    so a run cut short keeps what it finished).

    prompts: token-id lists; or None to encode `prompt_file` (default MT-Bench first turns)
    with `tokenizer.encode_chat`. draft: an EagleDraft (or any specc draft), a .safetensors
    path, or None for the shipped head (an untrained stand-in, noted, when there is none).
    hf_model: a transformers model for the HF baseline (default: `model` itself when it is
    one); HF runs on the first `hf_prompts` prompts, 0 skips it. stop_id: the end-of-turn
    token for mean_accept_length_until_eos (default: the tokenizer's eos_id).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
    if hf_prompts < 0:
        raise ValueError(f"hf_prompts={hf_prompts}; use 0 to skip HF eager generate")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes={list(batch_sizes)}; give one or more sizes >= 1")
    if n_prompts is not None and n_prompts < 1:
        raise ValueError(f"n_prompts={n_prompts}; give at least 1, or None for every prompt")
    if not trees:
        raise ValueError("no trees given; pass e.g. trees=['eagle']")
    for tree in trees:
        _check_tree(tree)
    rows, prompts = _prompt_rows(tokenizer, prompts, prompt_file, n_prompts)
    draft, draft_info = resolve_draft(draft, model, seed)
    tree_names = [t if isinstance(t, str) else str(list(t)) for t in trees]
    max_seq_len = cache_length(prompts, max_new_tokens, trees)
    if stop_id is None and tokenizer is not None:
        stop_id = getattr(tokenizer, "eos_id", None)
    bench = _Bench(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, max_seq_len=max_seq_len, compile=compile, progress=progress,
                   stop_id=stop_id)
    if hf_model is None and hasattr(model, "generate"):
        hf_model = model
    hf_indices = list(range(min(hf_prompts, len(prompts)))) if hf_model is not None else []

    notes = [] if bench.greedy else [SAMPLED_NOTE]
    if draft_info["note"]:
        notes.append(draft_info["note"])
    if hf_prompts and hf_model is None:
        notes.append("HF eager generate skipped: no transformers model was given (hf_model=)")
    measure_untrained = untrained and draft_info["trained"]
    if untrained and not measure_untrained:
        notes.append("the untrained-head comparison was skipped: the measured head is itself untrained")
    # built before any measuring, so a draft that cannot be swapped fails at once
    swap_in = untrained_weights(draft, seed) if measure_untrained else None
    report = {
        "benchmark": "end-to-end decode: HF eager vs specc plain vs specc speculative",
        "environment": environment(),
        "command": command if command is not None else shlex.join(sys.argv),
        "parameters": {"trees": tree_names, "batch_sizes": list(batch_sizes), "max_new_tokens": max_new_tokens,
                       "mode": "greedy" if bench.greedy else "sampled", "temperature": temperature, "top_k": top_k,
                       "top_p": top_p, "seed": seed, "hf_prompts": len(hf_indices), "untrained": measure_untrained,
                       "untrained_prompts": untrained_prompts if measure_untrained else None,
                       "compile": compile, "max_seq_len": max_seq_len, "prompt_file": str(prompt_file or "MT-Bench"),
                       "n_prompts": len(prompts), "dtype": str(next(model.parameters()).dtype), "stop_id": stop_id,
                       "device": str(next(model.parameters()).device)},
        "draft": draft_info,
        "notes": notes,
        "prompts": [{"index": i, **{k: v for k, v in r.items() if k != "prompt"}, "prompt_tokens": len(p)}
                    for i, (r, p) in enumerate(zip(rows, prompts))],
        "configurations": [],
    }
    for note in notes:
        print(f"*** NOTE: {note}", file=sys.stderr, flush=True)

    # every engine of a step kind shares one code object in Dynamo's cache: (trees x batch sizes)
    # engines would pass its default limit of 8 and fail under fullgraph=True
    limit = max(torch._dynamo.config.recompile_limit, 2 * (1 + len(trees)) * len(batch_sizes) + 8)
    with torch._dynamo.config.patch(recompile_limit=limit):
        _measure_all(bench, report, draft, trees, tree_names, batch_sizes, hf_model, hf_indices, swap_in, out,
                     untrained_prompts)
    return report


def cache_length(prompts: list[list[int]], max_new_tokens: int, trees: Sequence) -> int:
    """One cache length for every engine: what the longest prompt needs under the deepest
    tree's slack (specc.generate.cache_positions_needed), rounded up to 256."""
    longest = max(len(p) for p in prompts)
    needed = max(cache_positions_needed(longest, max_new_tokens, plan)
                 for plan in [None, *(tree_plan(split_draft_vocab(t)[0]) for t in trees)])
    return 256 * math.ceil(needed / 256)


def _prompt_rows(tokenizer, prompts, prompt_file, n_prompts) -> tuple[list[dict], list[list[int]]]:
    if prompts is not None:
        prompts = [list(map(int, p)) for p in prompts][:n_prompts]
        if not prompts:
            raise ValueError("prompts= is empty; give token-id lists or prompts=None for the prompt file")
        return [{"id": i, "category": ""} for i in range(len(prompts))], prompts
    if tokenizer is None:
        raise ValueError("pass tokenizer= to encode the prompt file, or prompts= as token-id lists")
    return load_prompts(tokenizer, prompt_file, n_prompts)


def _measure_all(bench: _Bench, report: dict, draft, trees, tree_names, batch_sizes, hf_model, hf_indices,
                 untrained: dict[str, torch.Tensor] | None, out, untrained_prompts: int | None = None) -> None:
    """HF, then per batch size plain and each tree with the head, then (given its weights) the
    untrained head in the same engines; the report is saved after each configuration."""
    weights = WeightsWatch(bench.model, draft)

    def add(config: dict, draft_swapped: bool = False) -> None:
        # Nothing a decode runs may write into the weights; a stray write (a kernel given a
        # position outside its cache) would corrupt every configuration measured after it.
        changed = weights.changed(draft=not draft_swapped)
        config["weights_changed"] = changed
        if changed:
            print(f"WARNING: after {_label(config)} the weights differ from the run's start: {', '.join(changed[:8])}"
                  f"{' ...' if len(changed) > 8 else ''}; this and later configurations ran other weights",
                  file=sys.stderr, flush=True)
        report["configurations"].append(config)
        report["ratios"] = ratios(report["configurations"], hf_indices, bench.stop_id)
        print(bench.report_line(config), file=sys.stderr, flush=True)
        _save(report, out)

    plain_compiled = torch.compile(bench.model, backend=specc.backend())
    spec_compiled = [torch.compile(bench.model, backend=specc.backend(draft=_draft_for(draft, t), tree=split_draft_vocab(t)[0]))
                     for t in trees]
    head = "trained" if report["draft"]["trained"] else "untrained"
    plain_by_batch = {}
    for batch in batch_sizes:
        plain_by_batch[batch] = bench.measure(plain_compiled, {"decoder": "plain", "tree": None, "head": None},
                                              batch, warm_up=True)
        add(plain_by_batch[batch])
        for name, compiled in zip(tree_names, spec_compiled):
            add(_spec(bench, compiled, name, head, batch, plain_by_batch[batch], warm_up=True))
    if untrained is not None:
        # the engines are compiled already: no warm-up, and compile_and_warmup_seconds is None
        with swapped_weights(draft, untrained):
            for batch in batch_sizes:
                for name, compiled in zip(tree_names, spec_compiled):
                    add(_spec(bench, compiled, name, "untrained", batch, plain_by_batch[batch], warm_up=False,
                              n_prompts=untrained_prompts), draft_swapped=True)
    # HF eager last: the slowest and least needed part of a run cut short by a time limit
    if hf_indices:
        add(bench.hf(hf_model, hf_indices))


def _draft_for(draft, tree):
    """The head a tree name asks for: `draft` itself, or with "@K" a twin sharing its weights
    that proposes from a draft vocabulary of K tokens (specc/draft/vocab.py)."""
    size = split_draft_vocab(tree)[1]
    if size is None:
        return draft
    if not hasattr(draft, "with_draft_vocab"):
        raise ValueError(f"tree {tree!r} asks for a draft vocabulary, which only an EagleDraft has")
    return draft.with_draft_vocab(size)


def _spec(bench: _Bench, compiled, tree: str, head: str, batch: int, plain: dict, warm_up: bool,
          n_prompts: int | None = None) -> dict:
    config = bench.measure(compiled, {"decoder": "spec", "tree": tree, "head": head}, batch, warm_up, n_prompts)
    compare_with_plain(config, plain, bench.model, bench.prompts, bench.greedy)
    for row in config["per_prompt"]:
        if row.get("equal_to_plain"):
            del row["tokens"]  # the plain row's tokens: not stored twice
    return config


# ----- output --------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict) -> str:
    """The short table printed last: one line per configuration, ratios alongside."""
    env, params = report["environment"], report["parameters"]
    over_plain = {(r["tree"], r["head"], r["batch"]): r["tokens_per_second"]
                  for r in report["ratios"]["spec_over_plain"]}
    over_hf = {(r["decoder"], r["tree"], r["head"], r["batch"]): r["tokens_per_second"]
               for r in report["ratios"]["over_hf_eager"]}
    lines = [
        f"GPU {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {params['dtype']} on {params['device']}",
        f"draft: {report['draft']['source']} | {params['mode']} | {params['n_prompts']} prompts x "
        f"{params['max_new_tokens']} new tokens | cache {params['max_seq_len']} | HF on {params['hf_prompts']} prompts",
        *(f"NOTE: {note}" for note in report["notes"]),
        f"{'decoder':<8}{'tree':<16}{'head':<10}{'batch':>5}{'tok/s':>10}{'decode':>10}{'ms/tok':>10}"
        f"{'accept':>8}{'<eos':>7}{'x plain':>9}{'x HF':>8}{'equal':>9}",
    ]
    for c in report["configurations"]:
        key = (c["tree"], c["head"], c["batch"])
        equal = f"{c['equal_to_plain']}/{c['compared']}" if c.get("equal_to_plain") is not None else "-"
        lines.append(
            f"{c['decoder']:<8}{c['tree'] or '-':<16}{c['head'] or '-':<10}{c['batch']:>5}"
            f"{_fmt(c['tokens_per_second'], '.1f'):>10}{_fmt(c['decode_tokens_per_second'], '.1f'):>10}"
            f"{_fmt(c['ms_per_output_token'], '.3f'):>10}{_fmt(c['mean_accept_length'], '.2f'):>8}"
            f"{_fmt(c.get('mean_accept_length_until_eos'), '.2f'):>7}"
            f"{_fmt(over_plain.get(key), '.2f'):>9}{_fmt(over_hf.get((c['decoder'], *key)), '.1f'):>8}{equal:>9}"
        )
    for c in report["configurations"]:
        for d in c.get("divergences") or []:
            if d.get("index") is not None:
                lines.append(f"  {_label(c)} prompt {d['prompt_index']}: first divergence at token {d['index']}, "
                             f"top-2 margin {d['top2_margin']:.4f}")
    return "\n".join(lines)


def plot(report: dict, out_dir: str | Path) -> list[Path]:
    """tokens_per_second.png (per configuration, grouped by batch size) and accept_lengths.png
    (the accept-length histogram per tree and head, all batch sizes pooled). Needs matplotlib;
    without it, says so and writes nothing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        print("matplotlib is not installed: no plots written (pip install matplotlib)", file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_plot_tokens_per_second(report, out_dir / "tokens_per_second.png", Figure)]
    if any(c["decoder"] == "spec" for c in report["configurations"]):
        paths.append(_plot_accept_lengths(report, out_dir / "accept_lengths.png", Figure))
    return paths


def _series_name(config: dict) -> str:
    if config["decoder"] == "hf":
        return "HF eager"
    return "specc plain" if config["decoder"] == "plain" else f"spec {config['tree']} ({config['head']})"


def _plot_tokens_per_second(report: dict, path: Path, Figure) -> Path:
    configs = report["configurations"]
    batches = sorted({c["batch"] for c in configs})
    series = list(dict.fromkeys(_series_name(c) for c in configs))
    width = 0.8 / len(series)
    figure = Figure(figsize=(min(16.0, max(6.0, 2.0 + 0.45 * len(series) * len(batches))), 4.5), layout="constrained")
    axes = figure.add_subplot()
    for s, name in enumerate(series):
        values = {c["batch"]: c["tokens_per_second"] for c in configs if _series_name(c) == name}
        xs = [b + s * width - 0.4 + width / 2 for b in range(len(batches)) if batches[b] in values]
        bars = axes.bar(xs, [values[b] for b in batches if b in values], width, label=name)
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    axes.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    axes.set_ylabel("tokens/s (prefill + decode)")
    params = report["parameters"]
    axes.set_title(f"{params['mode']}, {params['n_prompts']} prompts x {params['max_new_tokens']} tokens, "
                   f"{report['environment']['gpu'] or params['device']}", fontsize=9)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return path


def _pool(histograms: list[list[int]]) -> list[int]:
    size = max(len(h) for h in histograms)
    return [sum(h[k] for h in histograms if k < len(h)) for k in range(size)]


def _plot_accept_lengths(report: dict, path: Path, Figure) -> Path:
    spec = [c for c in report["configurations"] if c["decoder"] == "spec"]
    trees = list(dict.fromkeys(c["tree"] for c in spec))
    figure = Figure(figsize=(4.0 * len(trees), 3.5), layout="constrained")
    for t, tree in enumerate(trees):
        axes = figure.add_subplot(1, len(trees), t + 1)
        heads = list(dict.fromkeys(c["head"] for c in spec if c["tree"] == tree))
        width, most = 0.8 / len(heads), 1
        for h, head in enumerate(heads):
            pooled = _pool([c["accept_length_histogram"] for c in spec if (c["tree"], c["head"]) == (tree, head)])
            total = sum(pooled) or 1
            lengths = range(1, len(pooled))
            axes.bar([k + h * width - 0.4 + width / 2 for k in lengths], [pooled[k] / total for k in lengths],
                     width, label=head)
            most = max(most, len(pooled) - 1)
        axes.set_xticks(range(1, most + 1))
        axes.set_title(f"tree {tree}", fontsize=9)
        axes.set_xlabel("tokens per step (accept length, bonus included)")
        axes.set_ylabel("fraction of steps")
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return path


# ----- command line --------------------------------------------------------------------------
def _argument(parse):
    """An argparse `type` that keeps the parser's own error message."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return convert


def _one_tree(text: str) -> str:
    _check_tree(text)
    return text


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `specc bench spec` (also `python -m specc.bench.end_to_end`)."""
    parser.add_argument("--model", default=None, help="a Llama GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", default=None,
                        help="EAGLE head .safetensors (default: the shipped head; an untrained one, noted, if none)")
    parser.add_argument("--trees", type=_argument(parse_trees), default=TREE_SEPARATOR.join(DEFAULT_TREES),
                        help=f"trees separated by '{TREE_SEPARATOR}' (commas belong to dynamic:top_k,depth,size); "
                             f"default {TREE_SEPARATOR.join(DEFAULT_TREES)!r}")
    parser.add_argument("--tree", type=_argument(_one_tree), action="append", default=None,
                        help="one tree; repeat for several (replaces --trees)")
    parser.add_argument("--prompts", default=None, help="JSONL with `turns` per line (default: MT-Bench)")
    parser.add_argument("--n-prompts", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=_argument(parse_batch_sizes), default="1",
                        help="comma-separated, e.g. 1,4,16")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt i samples with seed + i; also seeds the untrained heads")
    parser.add_argument("--hf-prompts", type=int, default=8,
                        help="HF eager generate on the first N prompts at batch 1 (0 = skip)")
    parser.add_argument("--untrained", action="store_true",
                        help="also measure an untrained head of the same shape in the same compiled engines")
    parser.add_argument("--untrained-prompts", type=int, default=None,
                        help="measure the untrained head on the first N prompts only (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="run the rewritten programs without Inductor (CPU)")
    parser.add_argument("--out", default=None, help="write the JSON report here (rewritten after each configuration)")
    parser.add_argument("--plots", default=None, help="write tokens_per_second.png and accept_lengths.png here")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.set_defaults(func=cmd_spec)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `spec` to a subparsers object (the CLI's `specc bench` group)."""
    parser = subparsers.add_parser("spec", help="speculative vs plain vs HF eager decode, end to end (GPU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(parser)


def cmd_spec(args: argparse.Namespace) -> int:
    """Load the real model (specc's Llama, and HF's for the baseline) and run the benchmark."""
    from specc.models.load import load_hf_llama, load_llama

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    model, tokenizer = load_llama(args.model, dtype=dtype, device=device)
    hf_model = None
    if args.hf_prompts:
        try:
            hf_model, _ = load_hf_llama(args.model, dtype=dtype, device=device)
        except ImportError as error:
            print(f"HF eager generate skipped: {error}", file=sys.stderr)
    report = run(model, tokenizer, prompt_file=args.prompts, n_prompts=args.n_prompts, draft=args.draft,
                 trees=args.tree or args.trees, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 hf_model=hf_model, hf_prompts=args.hf_prompts, untrained=args.untrained,
                 untrained_prompts=args.untrained_prompts,
                 compile=not args.no_compile, out=args.out, command=getattr(args, "command_line", None))
    if args.plots:
        for path in plot(report, args.plots):
            print(f"plot written: {path}", file=sys.stderr)
    print(summary_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`specc bench spec ...` as a standalone entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = configure_parser(argparse.ArgumentParser(prog="specc bench spec", description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["specc", "bench", "spec", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
