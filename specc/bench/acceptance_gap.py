"""Does real decoding accept what the draft, teacher-forced, says it should? (`specc bench gap`)

For greedy chain drafting the answer is known in advance. On the target's own greedy text, a
step whose root token sits at position P drafts the chain that starts at s = P - 1; that chain's
leading matches, computed teacher-forced in one pass (specc.draft.train.chain_match_counts),
are what the step must accept. So for every step a decode takes, the predicted accept length
is 1 + min(count[P - 1], depth), and in fp32 on the CPU real decoding equals it step for step
(tests/bench/test_acceptance_gap.py). Where a decoder accepts less than predicted on the same
text, its draft computes something other than what training taught: a bug or a precision loss
in that implementation, not a weak head.

This measures it per implementation of the same step, on MT-Bench first turns:
  reference        uncompiled, the specc ops as their PyTorch references (SPECC_KERNELS)
  triton           uncompiled, the specc ops as Triton kernels (the same as reference on CPU)
  triton_graph     uncompiled, Triton kernels, the step replayed from a CUDA graph
  compiled_reference  Inductor-compiled prefill and step, the specc ops as their references
  compiled         Inductor-compiled prefill and step, no CUDA graph
  compiled_graph   Inductor-compiled and CUDA graph: what `specc generate` and `specc bench spec` run
and reports, per mode, the mean actual and predicted accept length, the share of steps whose
accept length equals the prediction, and P(draft d right | drafts before it right), actual
against predicted. Predictions come from the eager teacher-forced draft, in the model's dtype,
on the very text the mode's speculative decode wrote (its own output: lossless, so the target's
greedy text up to near-ties).

    specc bench gap --draft head.safetensors --prompts 0,10,20,30,40,50,60,70 --out gap.json

The same comparison after the fact, on the CPU, for a chain configuration of a `specc bench
spec` report (its per-step accept lengths and tokens, MT-Bench prompts), with the head it ran:

    specc bench gap --from-spec results/.../spec.json --tree chain:6 --draft head.safetensors --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import specc
from specc.bench.common import WeightsWatch, environment, read_report
from specc.bench.end_to_end import load_prompts
from specc.draft.train import chain_match_counts, step0_features, target_states, unroll

MODES = ("reference", "triton", "triton_graph", "compiled_reference", "compiled", "compiled_graph")
_MODE_SETTINGS = {  # kernels, compile, cuda_graph
    "reference": ("reference", False, False),
    "triton": ("triton", False, False),
    "triton_graph": ("triton", False, True),
    "compiled_reference": ("reference", True, False),
    "compiled": ("triton", True, False),
    "compiled_graph": ("triton", True, True),
}


@torch.no_grad()
def teacher_forced_counts(target: torch.nn.Module, draft, input_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """count[s]: leading matches (at most `depth`) of the teacher-forced chain at start s, on the
    one sequence input_ids [1, T] (the target's greedy text after its prompt)."""
    final, layers = target_states(target, input_ids, draft.config.feature_layers)
    target_argmax = F.linear(final, target.lm_head.weight).argmax(-1)
    hidden = unroll(draft, input_ids, step0_features(draft, final, layers)[:, :-1], depth)
    return chain_match_counts(draft, input_ids, target_argmax, hidden)[0][0]


def predicted_accepts(counts: torch.Tensor, prompt_len: int, accept_lengths: Sequence[int],
                      depth: int) -> list[int]:
    """The accept length each decode step should have had: the step that follows `e` emitted
    tokens has its root at position prompt_len + e - 1, so it drafts the chain at s = root - 1.
    Steps whose chain would run past the text's end, or that reach its end (a step the token
    budget cut short), are left out."""
    predicted, emitted = [], 1  # the first token came from prefill
    for length in accept_lengths:
        start = prompt_len + emitted - 2
        if start + depth + 1 > counts.numel() or prompt_len + emitted + length - 1 >= counts.numel():
            break
        predicted.append(1 + min(int(counts[start]), depth))
        emitted += length
    return predicted


def compare(actual: Sequence[int], predicted: Sequence[int], depth: int) -> dict:
    """Mean accept lengths, the share of steps that match, and P(draft d | d - 1) both ways."""
    actual = list(actual)[: len(predicted)]

    def rates(lengths: Sequence[int]) -> list[float | None]:
        reached = [sum(1 for a in lengths if a - 1 >= d) for d in range(depth + 1)]
        return [reached[d] / reached[d - 1] if reached[d - 1] else None for d in range(1, depth + 1)]

    steps = len(predicted)
    return {
        "steps": steps,
        "mean_actual": sum(actual) / steps if steps else None,
        "mean_predicted": sum(predicted) / steps if steps else None,
        "equal_share": sum(a == p for a, p in zip(actual, predicted)) / steps if steps else None,
        "rate_by_depth_actual": rates(actual),
        "rate_by_depth_predicted": rates(predicted),
    }


def judge(model: torch.nn.Module, draft, prompt: Sequence[int], tokens: Sequence[int],
          accept_lengths: Sequence[int], depth: int) -> tuple[list[int], list[int]]:
    """(actual, predicted) accept lengths of one decoded sequence: `tokens` the decode's output
    after `prompt`, `accept_lengths` its steps' (the steps without a prediction left out)."""
    ids = torch.tensor([list(prompt) + list(tokens)], device=next(model.parameters()).device)
    predicted = predicted_accepts(teacher_forced_counts(model, draft, ids, depth), len(prompt), accept_lengths, depth)
    return list(accept_lengths[: len(predicted)]), predicted


def pooled(mode: str, rows: list[dict], seconds: float, depth: int) -> dict:
    """compare() over every row's steps, the rows kept alongside."""
    actual = [a for row in rows for a in row["actual"]]
    predicted = [p for row in rows for p in row["predicted"]]
    return {"mode": mode, "seconds": round(seconds, 1), **compare(actual, predicted, depth), "per_prompt": rows}


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """SPECC_KERNELS set for the duration (lowering/registry.py reads it at call time)."""
    before = os.environ.get("SPECC_KERNELS")
    os.environ["SPECC_KERNELS"] = choice
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SPECC_KERNELS", None)
        else:
            os.environ["SPECC_KERNELS"] = before


def measure_mode(model: torch.nn.Module, draft, prompts: Sequence[Sequence[int]], mode: str, depth: int,
                 max_new_tokens: int, max_seq_len: int | None = None) -> dict:
    """One mode over the prompts: real chain decode and its predictions, per prompt and pooled."""
    if mode not in _MODE_SETTINGS:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    choice, compile, graph = _MODE_SETTINGS[mode]
    on_gpu = next(model.parameters()).is_cuda
    if graph and not on_gpu:
        raise ValueError(f"mode {mode!r} replays a CUDA graph; it needs the model on a GPU")
    spec = torch.compile(model, backend=specc.backend(draft=draft, tree=f"chain:{depth}"))
    rows = []
    start = time.perf_counter()
    # The predictions use the in-memory weights too, so a decode that wrote into them would
    # not show as a gap: say so separately.
    weights = WeightsWatch(model, draft)
    with kernels(choice):
        for index, prompt in enumerate(prompts):
            out = specc.generate(spec, [prompt], max_new_tokens=max_new_tokens, compile=compile, cuda_graph=graph,
                                 max_seq_len=max_seq_len)
            actual, predicted = judge(model, draft, prompt, out.tokens[0], out.accept_lengths, depth)
            rows.append({"prompt": index, **compare(actual, predicted, depth), "actual": actual, "predicted": predicted})
    return {**pooled(mode, rows, time.perf_counter() - start, depth), "weights_changed": weights.changed()}


def run(model: torch.nn.Module, draft, prompts: Sequence[Sequence[int]], modes: Sequence[str] = MODES,
        depth: int = 6, max_new_tokens: int = 128, max_seq_len: int | None = None,
        log=print) -> list[dict]:
    """Every mode in `modes` (those needing a GPU are skipped on the CPU, and said so)."""
    on_gpu = next(model.parameters()).is_cuda
    results = []
    for mode in modes:
        if _MODE_SETTINGS[mode][2] and not on_gpu:
            log(f"{mode}: skipped (needs a CUDA graph, so a GPU)")
            continue
        torch._dynamo.reset()
        result = measure_mode(model, draft, prompts, mode, depth, max_new_tokens, max_seq_len)
        log(summary_line(result))
        results.append(result)
    return results


def analyse_spec_report(report: dict, model: torch.nn.Module, draft, prompts: Sequence[Sequence[int]], tree: str,
                        indices: Sequence[int] | None = None) -> dict:
    """compare() for the chain configuration `tree` of a `specc bench spec` report: its rows'
    accept lengths against the teacher-forced predictions on each row's own output, with
    `draft` (the head the report measured) run eagerly here. prompts[i]: the token ids of the
    report's prompt i (report_prompts encodes them)."""
    if not tree.startswith("chain:"):
        raise ValueError(f"tree {tree!r}: predictions exist for chains only; give e.g. --tree chain:6")
    depth = int(tree.split(":")[1])
    configs = [c for c in report["configurations"] if c["decoder"] == "spec" and c["tree"] == tree
               and c["head"] == "trained" and c["batch"] == 1]
    if not configs:
        raise ValueError(f"the report has no trained batch-1 configuration of tree {tree!r}")
    plain = {r["index"]: r["tokens"] for c in report["configurations"] if c["decoder"] == "plain"
             for r in c["per_prompt"]}
    rows = []
    for row in configs[0]["per_prompt"]:
        if indices is not None and row["index"] not in indices:
            continue
        tokens = row.get("tokens", plain.get(row["index"]))  # the report drops rows equal to plain
        actual, predicted = judge(model, draft, prompts[row["index"]], tokens, row["accept_lengths"], depth)
        rows.append({"prompt": row["index"], **compare(actual, predicted, depth), "actual": actual, "predicted": predicted})
    return pooled(f"report {tree}", rows, 0.0, depth)


def report_prompts(report: dict, tokenizer) -> list[list[int]]:
    """A `specc bench spec` report's prompts as ChatML token ids (its prompt file, MT-Bench by default)."""
    prompt_file = report["parameters"].get("prompt_file")
    return load_prompts(tokenizer, None if prompt_file in (None, "MT-Bench") else prompt_file,
                        report["parameters"]["n_prompts"])[1]


def plot(results: Sequence[dict], path: str | Path) -> Path | None:
    """gap.png: P(draft d right | drafts before it right) per mode, actual (solid) against the
    teacher-forced prediction on the same steps (dashed). Needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    figure = Figure(figsize=(7.0, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for number, result in enumerate(results):
        color = f"C{number}"
        for key, style, label in (("rate_by_depth_actual", "-o", "actual"), ("rate_by_depth_predicted", "--", "predicted")):
            rates = result[key]
            axes.plot([d + 1 for d, r in enumerate(rates) if r is not None], [r for r in rates if r is not None], style,
                      color=color, label=f"{result['mode']}: {label} (mean accept {result['mean_' + label]:.2f})")
    axes.set_xlabel("draft token d of the chain")
    axes.set_ylabel("P(draft d accepted | drafts before it accepted)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title("real decode against the teacher-forced draft, same steps", fontsize=9)
    figure.savefig(path, dpi=120)
    return Path(path)


def summary_line(result: dict) -> str:
    rates = lambda key: "[" + ", ".join("-" if r is None else f"{r:.2f}" for r in result[key]) + "]"  # noqa: E731
    return (f"{result['mode']:<15} accept {result['mean_actual']:.3f} vs predicted {result['mean_predicted']:.3f}; "
            f"{result['equal_share']:.0%} of {result['steps']} steps as predicted; P(d | d-1) actual "
            f"{rates('rate_by_depth_actual')} predicted {rates('rate_by_depth_predicted')} ({result['seconds']} s)"
            + (f"; WEIGHTS CHANGED: {', '.join(result['weights_changed'][:4])}" if result.get("weights_changed") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="specc bench gap", description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--draft", default=None, help="EAGLE head .safetensors (default: the shipped head)")
    parser.add_argument("--model", default=None, help="a Llama GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", default="0,10,20,30,40,50,60,70", help="MT-Bench first-turn indices")
    parser.add_argument("--depth", type=int, default=6, help="the chain drafted (chain:DEPTH)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated among {','.join(MODES)}")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="one cache length for every prompt, as `specc bench spec` uses (default: sized per prompt)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--from-spec", default=None, metavar="SPEC_JSON",
                        help="analyse a `specc bench spec` report's (.json or .json.xz) chain configuration instead of decoding")
    parser.add_argument("--tree", default=None, help="with --from-spec: the chain configuration, e.g. chain:6")
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--plot", default=None, help="write the per-depth acceptance plot here (PNG)")
    parser.set_defaults(func=cmd_gap)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("gap", help="real decode's accept lengths against the teacher-forced draft's, "
                                   "per implementation (reference, Triton, compiled, CUDA graph)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(parser)


def check_modes(modes: list[str]) -> list[str]:
    """`modes`, or a SystemExit naming the unknown ones and the choices."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; pick among {', '.join(MODES)}")
    return modes


def load_model_and_head(args: argparse.Namespace, dtype_name: str | None):
    """The target (`--model`, default the embedded one) and the head (`--draft`, default the
    shipped one) on `--device`, in `dtype_name` (default bf16 on a GPU, fp32 on a CPU):
    (model, tokenizer, draft, dtype)."""
    from specc.draft import default_draft_path
    from specc.draft.eagle import load_draft
    from specc.models.load import load_llama

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name or ("bf16" if device == "cuda" else "fp32")]
    model, tokenizer = load_llama(args.model, dtype=dtype, device=device)
    draft = load_draft(args.draft or default_draft_path(), model, draft_vocab=getattr(args, "draft_vocab", None))
    return model, tokenizer, draft, dtype


def cmd_gap(args: argparse.Namespace) -> int:
    from specc.draft import default_draft_path

    modes = check_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    model, tokenizer, draft, dtype = load_model_and_head(args, args.dtype)
    indices = [int(i) for i in args.prompts.split(",")]
    if args.from_spec:
        report = read_report(args.from_spec)
        results = [analyse_spec_report(report, model, draft, report_prompts(report, tokenizer), args.tree or "chain:6",
                                       indices)]
        print(summary_line(results[0]), flush=True)
    else:
        every = load_prompts(tokenizer)[1]
        prompts = [every[i] for i in indices]
        results = run(model, draft, prompts, modes, args.depth, args.max_new_tokens, args.max_seq_len,
                      log=lambda line: print(line, flush=True))
    if args.plot:
        plot(results, args.plot)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "environment": environment(), "command": shlex.join(sys.argv),
            "draft": str(args.draft or default_draft_path()), "dtype": str(dtype), "prompts": indices,
            "depth": args.depth, "max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len,
            "from_spec": args.from_spec,
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
