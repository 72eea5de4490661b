"""Run two implementations of the speculative step on the same state, step by step, and say
where they part (`specc bench step-diff`).

`specc bench gap` tells whether an implementation accepts less than the head predicts; this
tells where its state goes wrong. Engine A (the reference: uncompiled, reference ops by default)
decodes a prompt; before each of its steps the whole decode state (target and draft caches,
root token, cache length, pending draft inputs) is copied into engine B, both step once from
it, and every buffer B leaves behind is compared with A's:

  out_tokens, n_out         the emitted tokens and how many (what the user sees)
  k_cache, v_cache          the target cache, positions < the new cache_len
  draft_k, draft_v          the draft cache, positions the next step will read
                            (< new cache_len - new pending_count)
  pending_feats             the next step's draft inputs, the pending_count real rows

The prefill is compared the same way first: A and B each prefill the prompt from scratch.
The weights' checksums are compared too, after the engines are built (a CUDA-graph engine runs
warm-up steps then) and at the end: a stray write into them would change both sides alike.

Differences are max |a - b|, per buffer and, for the caches, per layer and the first position
that differs by more than `tolerance`. In fp32 two correct implementations differ by rounding
(~1e-5); bf16 by ~1e-2, and a wrong one by the size of the values (~1). The run stops at A's
stop token or after `steps`.

    specc bench step-diff --b compiled_graph --dtype fp32 --prompt 0 --steps 24
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import specc
from specc.bench.acceptance_gap import _MODE_SETTINGS, MODES, check_modes, kernels, load_model_and_head
from specc.bench.common import WeightsWatch, environment
from specc.passes.decode_step import Sampling

STATE = ("tokens", "cache_len", "k_cache", "v_cache", "seeds", "draft_k", "draft_v",
         "pending_tokens", "pending_feats", "pending_count")


class Side:
    """One implementation's engine, its step callable and its kernels choice."""

    def __init__(self, spec: torch.nn.Module, mode: str, tree: str, max_seq_len: int) -> None:
        from specc.generate import Engine, EngineKey, target_program, tree_plan

        if mode not in _MODE_SETTINGS:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.choice, compile, graph = _MODE_SETTINGS[mode]
        program, backend = target_program(spec)
        if graph and program.device.type != "cuda":
            raise ValueError(f"mode {mode!r} replays a CUDA graph; it needs the model on a GPU")
        key = EngineKey(batch=1, max_seq_len=max_seq_len, sampling=Sampling(0.0, 0, 1.0), compile=compile,
                        cuda_graph=graph, tree=tree_plan(tree))
        with kernels(self.choice):
            self.engine = Engine(program, key, backend.draft)
        self.buffers = self.engine.buffers

    def state(self) -> list[torch.Tensor]:
        return list(self.buffers.step_args())

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.engine.loop
        with kernels(self.choice), torch.no_grad():
            if loop.step is not None:
                out, n_out = loop.step.replay()
            else:
                out, n_out = loop._eager_step(*self.buffers.step_args())
        return out.clone(), n_out.clone()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max())


def _cache_diff(a: torch.Tensor, b: torch.Tensor, length: int, tolerance: float) -> dict:
    """Cache [L, 1, Hkv, S, D] compared on positions < length: max diff per layer, first bad position."""
    if length <= 0:
        return {"max": 0.0, "per_layer": [], "first_bad_position": None}
    diff = (a[:, 0, :, :length].float() - b[:, 0, :, :length].float()).abs()  # [L, Hkv, length, D]
    by_position = diff.amax(dim=(0, 1, 3))
    bad = (by_position > tolerance).nonzero()
    return {"max": float(diff.max()), "per_layer": [round(float(x), 6) for x in diff.amax(dim=(1, 2, 3))],
            "first_bad_position": int(bad[0]) if bad.numel() else None}


def compare_states(a: Side, b: Side, tolerance: float) -> dict:
    """Every buffer of B's decode state against A's, on the entries the next step reads."""
    sa, sb = dict(zip(STATE, a.state())), dict(zip(STATE, b.state()))
    length = int(sa["cache_len"][0])
    pending = int(sa["pending_count"][0])
    return {
        "state_equal": {name: bool(torch.equal(sa[name], sb[name])) for name in ("tokens", "cache_len", "pending_count")},
        "pending_feats": _max_diff(sa["pending_feats"][0, :pending], sb["pending_feats"][0, :pending]),
        "k_cache": _cache_diff(sa["k_cache"], sb["k_cache"], length, tolerance),
        "v_cache": _cache_diff(sa["v_cache"], sb["v_cache"], length, tolerance),
        "draft_k": _cache_diff(sa["draft_k"], sb["draft_k"], length - pending, tolerance),
        "draft_v": _cache_diff(sa["draft_v"], sb["draft_v"], length - pending, tolerance),
    }


@torch.no_grad()
def run(model: torch.nn.Module, draft, prompt: Sequence[int], mode_a: str = "reference", mode_b: str = "compiled",
        tree: str = "chain:6", steps: int = 24, stop_ids: Sequence[int] = (), tolerance: float | None = None,
        log=print) -> dict:
    """Step A and B from A's state `steps` times; per step, what differs (module docstring)."""
    from specc.generate import _default_max_seq_len, tree_plan

    dtype = next(model.parameters()).dtype
    tolerance = tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 0.1)
    max_seq_len = _default_max_seq_len([list(prompt)], steps, tree_plan(tree))  # what specc.generate would size
    spec = torch.compile(model, backend=specc.backend(draft=draft, tree=tree))
    weights = WeightsWatch(model, draft)
    a = Side(spec, mode_a, tree, max_seq_len)
    b = Side(spec, mode_b, tree, max_seq_len)  # a CUDA-graph side runs its warm-up steps here
    after_build = weights.changed()
    if after_build:
        log(f"WEIGHTS CHANGED while building the engines: {', '.join(after_build)}")
    prefill = []  # (logits, features) of the first token, A's then B's
    for side in (a, b):
        with kernels(side.choice):
            input_ids, prompt_lens = side.buffers.load_prompts([list(prompt)], [0])
            logits, hidden = side.engine.loop.prefill(input_ids, prompt_lens, *side.buffers.prefill_args())
            side.buffers.after_prefill(prompt_lens, side.engine.choose_first(logits, hidden))
            prefill.append((logits.float().clone(), hidden.float().clone()))
    prefill_row = compare_states(a, b, tolerance)
    prefill_row["logits"] = _max_diff(prefill[0][0], prefill[1][0])
    prefill_row["features"] = _max_diff(prefill[0][1], prefill[1][1])
    log("prefill: " + line(prefill_row) + f"; logits {prefill_row['logits']:.2e}; features {prefill_row['features']:.2e}")
    buffers = a.buffers
    rows = []
    emitted = [int(buffers.tokens[0, 0])]
    for index in range(steps):
        for target, source in zip(b.state(), a.state()):
            target.copy_(source)
        out_a, n_a = a.step()
        out_b, n_b = b.step()
        row = {
            "step": index,
            "n_out": [int(n_a[0]), int(n_b[0])],
            "tokens_equal": bool(int(n_a[0]) == int(n_b[0]) and torch.equal(out_a[0, : int(n_a[0])], out_b[0, : int(n_b[0])])),
            **compare_states(a, b, tolerance),
        }
        rows.append(row)
        log(line(row))
        emitted.extend(out_a[0, : int(n_a[0])].tolist())
        if any(t in stop_ids for t in emitted):
            break
    return {"mode_a": mode_a, "mode_b": mode_b, "tree": tree, "dtype": str(dtype), "tolerance": tolerance,
            "prompt_len": len(prompt), "weights_changed_by_engine_build": after_build,
            "weights_changed_by_the_end": weights.changed(), "prefill": prefill_row, "steps": rows,
            "accept_a": sum(r["n_out"][0] for r in rows) / len(rows), "accept_b": sum(r["n_out"][1] for r in rows) / len(rows),
            "steps_tokens_equal": sum(r["tokens_equal"] for r in rows)}


def line(row: dict) -> str:
    def cache(name: str) -> str:
        c = row[name]
        where = "" if c["first_bad_position"] is None else f"@{c['first_bad_position']}"
        return f"{name} {c['max']:.2e}{where}"

    head = ""
    if "step" in row:
        head = (f"step {row['step']:>3}: n_out A {row['n_out'][0]} B {row['n_out'][1]} "
                f"{'same tokens' if row['tokens_equal'] else 'TOKENS DIFFER'}; ")
    unequal = [name for name, same in row["state_equal"].items() if not same]
    return (head + (f"{', '.join(unequal).upper()} DIFFER; " if unequal else "") + f"pending_feats {row['pending_feats']:.2e}; "
            + "; ".join(cache(n) for n in ("k_cache", "v_cache", "draft_k", "draft_v")))


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--draft", default=None, help="EAGLE head .safetensors (default: the shipped head)")
    parser.add_argument("--model", default=None, help="a Llama GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", type=int, default=0, help="MT-Bench first-turn index")
    parser.add_argument("--tree", default="chain:6")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--a", default="reference", help=f"the reference implementation, among {','.join(MODES)}")
    parser.add_argument("--b", default="compiled_graph", help="the implementation under test (comma-separated: several)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=None, help="JSON report")
    parser.set_defaults(func=cmd_step_diff)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("step-diff", help="two implementations of the speculative step from the same "
                                   "state, step by step: where their caches and outputs part",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(parser)


def cmd_step_diff(args: argparse.Namespace) -> int:
    from specc.bench.end_to_end import load_prompts

    check_modes([args.a, *args.b.split(",")])
    model, tokenizer, draft, _ = load_model_and_head(args, args.dtype)
    prompt = load_prompts(tokenizer)[1][args.prompt]
    results = []
    for mode_b in args.b.split(","):
        torch._dynamo.reset()
        print(f"--- A {args.a} against B {mode_b}, {args.tree}, {args.dtype}", flush=True)
        result = run(model, draft, prompt, args.a, mode_b, args.tree, args.steps, stop_ids=(tokenizer.eos_id,),
                     log=lambda text: print(text, flush=True))
        print(f"accept A {result['accept_a']:.2f} B {result['accept_b']:.2f}; "
              f"{result['steps_tokens_equal']}/{len(result['steps'])} steps emit the same tokens", flush=True)
        results.append(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": environment(), "command": shlex.join(sys.argv),
                                              "prompt": args.prompt, "results": results}, indent=1))
    return 0
