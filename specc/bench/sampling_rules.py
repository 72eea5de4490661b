"""Accept length of speculative sampling: the draft's true probabilities ("rrs") against q = 1.

The EAGLE reference code, vLLM and SGLang verify a sampled draft token as if the draft had
proposed it with probability 1 ("q_one": accept x with probability p(x)); specc's static trees
draw each node's children from the draft's distribution q without replacement and verify them
by recursive rejection sampling with the true q ("rrs": accept with min(1, p(x) / q(x))). Both
are exact (tests/passes/test_speculative_sampling.py); this measures how many more tokens per
target forward the true probabilities buy, with the same head, the same tree, the same prompts
and the same seeds, at each temperature.

    specc bench sampling --out sampling.json      # GPU: MT-Bench first turns, T 0.7 and 1.0

`cuda_graph=True, compile=False` runs the speculative step without Inductor, captured in a CUDA
graph: the accept length depends only on the math, not on the compiler, and this skips one
compilation per (temperature, rule). Tokens/s are printed for orientation only: they are not
those of the compiled step (`specc bench spec` measures those).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import specc
from specc.bench.common import environment, mt_bench_first_turns
from specc.generate import cache_positions_needed, tree_plan

RULES = ("rrs", "q_one")


def run(model, tokenizer, draft, *, tree: str = "eagle", temperatures=(0.7, 1.0), rules=RULES, top_p: float = 1.0,
        n_prompts: int | None = None, per_category: int | None = None, max_new_tokens: int = 256, seed: int = 0,
        compile: bool = False, cuda_graph: bool | None = None, out: str | Path | None = None,
        command: str | None = None) -> dict:
    """Mean accept length per (temperature, rule) on the MT-Bench first turns, batch 1."""
    rows = mt_bench_first_turns(limit=n_prompts, per_category=per_category)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    on_gpu = next(model.parameters()).device.type == "cuda"
    cuda_graph = on_gpu if cuda_graph is None else cuda_graph
    needed = cache_positions_needed(max(len(p) for p in prompts), max_new_tokens, tree_plan(tree))
    max_seq_len = 256 * -(-needed // 256)
    report = {"benchmark": "speculative sampling: true draft probabilities (rrs) vs q = 1 (q_one)",
              "environment": environment(), "command": command or shlex.join(sys.argv),
              "parameters": {"tree": tree, "temperatures": list(temperatures), "rules": list(rules), "top_p": top_p,
                             "n_prompts": len(prompts), "per_category": per_category,
                             "max_new_tokens": max_new_tokens, "seed": seed,
                             "compile": compile, "cuda_graph": cuda_graph, "max_seq_len": max_seq_len,
                             "draft": getattr(draft, "source", None) or "given"},
              "results": []}
    started = time.perf_counter()
    for rule in rules:
        compiled = torch.compile(model, backend=specc.backend(draft=draft, tree=tree, verify_rule=rule))
        for temperature in temperatures:
            emitted = steps = 0
            seconds = 0.0
            for index, prompt in enumerate(prompts):
                def generate(graph: bool):
                    return specc.generate(compiled, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed + index, max_seq_len=max_seq_len, compile=compile,
                                          cuda_graph=graph)
                try:
                    result = generate(cuda_graph)
                except RuntimeError as error:
                    if not cuda_graph or compile:
                        raise
                    # the uncompiled step failed to capture: same math without the graph (slower)
                    report["parameters"]["cuda_graph"] = cuda_graph = False
                    report.setdefault("notes", []).append(f"CUDA-graph capture of the eager step failed "
                                                          f"({type(error).__name__}: {str(error)[:200]}); ran without")
                    print(report["notes"][-1], file=sys.stderr, flush=True)
                    result = generate(False)
                emitted += sum(result.accept_lengths)
                steps += result.steps
                seconds += result.prefill_seconds + result.decode_seconds
            entry = {"rule": rule, "temperature": temperature, "mean_accept_length": emitted / steps,
                     "steps": steps, "decode_tokens": emitted, "seconds": seconds}
            report["results"].append(entry)
            print(f"[{time.perf_counter() - started:7.1f}s] {tree} T={temperature} {rule}: "
                  f"{entry['mean_accept_length']:.3f} tokens per target forward", file=sys.stderr, flush=True)
            if out:
                Path(out).write_text(json.dumps(report, indent=1))
    return report


def summary_table(report: dict) -> str:
    by = {(r["temperature"], r["rule"]): r["mean_accept_length"] for r in report["results"]}
    lines = [f"GPU {report['environment']['gpu']} | tree {report['parameters']['tree']} | "
             f"{report['parameters']['n_prompts']} prompts x {report['parameters']['max_new_tokens']} tokens",
             "| temperature | rrs (true q) | q_one (q = 1) | rrs / q_one |", "|---|---|---|---|"]
    for temperature in report["parameters"]["temperatures"]:
        rrs, q_one = by.get((temperature, "rrs")), by.get((temperature, "q_one"))
        ratio = f"{rrs / q_one:.3f}" if rrs and q_one else "-"
        lines.append(f"| {temperature} | {rrs or float('nan'):.3f} | {q_one or float('nan'):.3f} | {ratio} |")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--draft", default=None, help="EAGLE head (default: the shipped head)")
    parser.add_argument("--tree", default="eagle", help="a static tree (rrs needs one)")
    parser.add_argument("--temperatures", default="0.7,1.0", help="comma-separated")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--n-prompts", type=int, default=None,
                        help="the first N MT-Bench first turns (default: all 80)")
    parser.add_argument("--per-category", type=int, default=None,
                        help="the first N prompts of each MT-Bench category (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile each engine with Inductor (slower to start)")
    parser.add_argument("--out", default=None)
    parser.set_defaults(func=cmd_sampling)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sampling", help="accept length of speculative sampling: true q vs q = 1 (GPU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(parser)


def cmd_sampling(args: argparse.Namespace) -> int:
    from specc.draft import default_draft_path
    from specc.draft.eagle import load_draft
    from specc.models.load import load_llama

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_llama(None, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    path = args.draft or default_draft_path()
    if path is None:
        print("no draft head: pass --draft", file=sys.stderr)
        return 2
    draft = load_draft(path, model)
    draft.source = str(path)
    report = run(model, tokenizer, draft, tree=args.tree,
                 temperatures=[float(t) for t in args.temperatures.split(",")], top_p=args.top_p,
                 n_prompts=args.n_prompts, per_category=args.per_category, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, compile=args.compile, out=args.out, command=shlex.join(sys.argv))
    print(summary_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="specc bench sampling", description=__doc__))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
