"""`specc bench profile`: which kernels one decode step runs, and how long each takes.

At batch 1 the embedded 135M model's step is bound by per-kernel costs, not by bandwidth (its
plain step takes 1.44 ms on an H200, its weights 65 µs to read), so the way to a faster
speculative step is fewer or shorter kernels. This command says which: for the plain step and
each tree, it decodes a prompt to build and capture the engine exactly as `specc.generate`
does, then profiles `steps` more replays of the captured step (they continue that decode) and
tables the device kernels per step: name, calls, µs, share, and totals by kind (GEMMs,
Inductor's fused kernels, specc's own Triton kernels, the rest).

    specc bench profile --trees "eagle;dynamic:8,8,64" --steps 50 --out profile.json --plot profile.png
    specc bench profile --from before=old.json --from after=profile.json --plot compare.png   # no profiling

On a CPU (tests) the step runs eagerly and the rows are aten ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch

from specc.bench.common import environment

# kinds, by the first rule the kernel name (lower case) meets. Inductor's kernels come before
# specc's because Inductor names a fused kernel after the ops it reads, so the rotary kernel that
# feeds specc::kv_write is "triton_poi_fused_..._kv_write_..." and is Inductor's, not specc's.
GEMM_PATTERNS = ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet", "sm90_", "sm80_", "aten::mm", "aten::addmm", "aten::bmm")
SPECC_PATTERNS = ("tree_attention", "kv_write", "verify_greedy", "verify_sampling", "commit_kv", "select_tree",
                  "topk_chunks", "topk_merge", "advance_state", "specc::")


def kernel_kind(name: str) -> str:
    """"gemm", "inductor", "specc" or "other", by the kernel's name."""
    lower = name.lower()
    if any(p in lower for p in GEMM_PATTERNS):
        return "gemm"
    if lower.startswith("triton_"):
        return "inductor"
    if any(p in lower for p in SPECC_PATTERNS):
        return "specc"
    return "other"


def kernel_rows(events, steps: int, device_kernels: bool) -> list[dict]:
    """Profiler events -> one row per kernel name: calls and µs per step, share of the step's
    total, kind; the most expensive first. `device_kernels`: the CUDA kernels' durations;
    otherwise the CPU ops' self times (so nested ops are not counted twice)."""
    calls: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    for event in events:
        if device_kernels:
            if event.device_type.name != "CUDA":
                continue
            duration = event.time_range.elapsed_us()  # a kernel event's own span on the GPU
        else:
            if event.device_type.name != "CPU" or not event.name.startswith(("aten::", "specc::")):
                continue
            duration = event.self_cpu_time_total
        calls[event.name] += 1
        micros[event.name] += duration
    total = sum(micros.values()) or 1.0
    rows = [{"name": name, "kind": kernel_kind(name), "calls_per_step": calls[name] / steps,
             "us_per_step": micros[name] / steps, "share": micros[name] / total} for name in calls]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def step_timeline(events, steps: int) -> list[dict]:
    """The device kernels of the first profiled step, in launch order: name, kind, start (µs
    from the step's first kernel) and duration. In a CUDA graph the order is the step's program
    order (catch-up, draft levels, verify, commit), so where a phase begins and how long the
    gaps between kernels are can be read off it."""
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per_step = len(kernels) // steps if steps else 0
    if not per_step:
        return []
    first = kernels[0].time_range.start
    return [{"name": e.name, "kind": kernel_kind(e.name), "start_us": e.time_range.start - first,
             "us": e.time_range.elapsed_us()} for e in kernels[:per_step]]


def draft_verify_split(timeline: list[dict], n_layers: int) -> dict | None:
    """A speculative step's timeline cut into the draft (catch-up and levels) and the rest
    (verify, accept, commit), or None where there is no draft (plain step, no timeline).

    The target's forward runs one tree attention per layer, the draft one per forward before
    it; the draft ends with its last top-k (`topk_merge_kernel`) before the verify's first tree
    attention. Each phase's span runs from its first kernel's start to the next phase's."""
    attention = [i for i, kernel in enumerate(timeline) if kernel["name"] == "tree_attention_kernel"]
    if len(attention) <= n_layers:
        return None
    verify_attention = attention[len(attention) - n_layers]
    top_k = [i for i in range(verify_attention) if timeline[i]["name"] == "topk_merge_kernel"]
    if not top_k:
        return None
    end = top_k[-1] + 1  # the verify's first kernel
    span = timeline[-1]["start_us"] + timeline[-1]["us"]
    return {"draft_kernels": end, "draft_us": timeline[end]["start_us"],
            "verify_kernels": len(timeline) - end, "verify_us": span - timeline[end]["start_us"]}


def by_kind(rows: list[dict]) -> dict[str, dict]:
    kinds: dict[str, dict] = {}
    for row in rows:
        entry = kinds.setdefault(row["kind"], {"kernels_per_step": 0.0, "us_per_step": 0.0, "share": 0.0})
        entry["kernels_per_step"] += row["calls_per_step"]
        entry["us_per_step"] += row["us_per_step"]
        entry["share"] += row["share"]
    return kinds


def profile_engine(engine, steps: int, n_layers: int | None = None) -> dict:
    """Profile `steps` steps of a built engine (replays of its CUDA graph, or eager steps): the
    steps continue the engine's last decode, so its cache must have room for them. `n_layers`
    (the target's) splits a speculative step into draft and verify (`draft_verify_split`)."""
    from torch.profiler import ProfilerActivity, profile

    loop = engine.loop
    on_gpu = engine.buffers.k_cache.device.type == "cuda"

    def step():
        return loop.step.replay() if loop.step is not None else loop._eager_step(*engine.buffers.step_args())

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    step()  # one unprofiled step: nothing first-call about the profiled ones
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.events()
    rows = kernel_rows(events, steps, device_kernels=on_gpu)
    timeline = step_timeline(events, steps)  # device kernels only: empty on a CPU
    return {
        "steps": steps,
        "cuda_graph": loop.step is not None,
        "timing": "device kernel durations" if on_gpu else "CPU self time of aten and specc ops",
        "kernels_per_step": sum(r["calls_per_step"] for r in rows),
        "us_per_step": sum(r["us_per_step"] for r in rows),
        "by_kind": by_kind(rows),
        "kernels": rows,
        # first kernel's start to last kernel's end of one step: kernel time plus the gaps
        "span_us": timeline[-1]["start_us"] + timeline[-1]["us"] if timeline else None,
        "phases": draft_verify_split(timeline, n_layers) if n_layers else None,
        "timeline": timeline,
    }


def run(model, draft, prompt: list[int], trees: list[str], steps: int = 50, warm_tokens: int = 32,
        compile: bool = True, log=print, max_seq_len: int | None = None) -> list[dict]:
    """The plain step, then each tree's: decode `warm_tokens` of `prompt` (engine built and
    captured as `specc.generate` builds it), then profile `steps` more steps. `max_seq_len`:
    the cache's capacity (default: just enough), which sets tree attention's prefix chunk count,
    so pass what the benchmark being explained used (`specc bench spec`: 2,304 at 256 tokens)."""
    import specc
    from specc.generate import tree_plan

    configurations = ["plain", *trees]
    # every capacity is checked before the first compile, so a bad one fails at once
    capacities = cache_capacities(prompt, configurations, steps, warm_tokens, max_seq_len)
    results = []
    for tree, capacity in zip(configurations, capacities):
        torch._dynamo.reset()
        plan = None if tree == "plain" else tree_plan(tree)
        backend = specc.backend() if plan is None else specc.backend(draft=draft, tree=tree)
        compiled = torch.compile(model, backend=backend)
        specc.generate(compiled, [prompt], max_new_tokens=warm_tokens, max_seq_len=capacity, compile=compile)
        (engine,) = compiled.__dict__["_specc_engines"].values()
        result = {"tree": tree, **profile_engine(engine, steps, model.config.num_hidden_layers)}
        log(summary(result))
        results.append(result)
    return results


def cache_capacities(prompt: list[int], configurations: list[str], steps: int, warm_tokens: int,
                     max_seq_len: int | None) -> list[int]:
    """Each configuration's cache capacity: `max_seq_len`, or just enough where it is None.
    Raises a ValueError naming the configuration if `max_seq_len` leaves no room for the warm
    decode and the profiled steps (each advancing up to depth + 1)."""
    from specc.generate import _default_max_seq_len, tree_plan

    capacities = []
    for tree in configurations:
        plan = None if tree == "plain" else tree_plan(tree)
        needed = _default_max_seq_len([prompt], warm_tokens + steps + 2, plan)
        if max_seq_len is not None and max_seq_len < needed:
            raise ValueError(f"--max-seq-len {max_seq_len} is too small for this prompt, {warm_tokens} warm tokens "
                             f"and {steps} steps of {tree}: give at least {needed}")
        capacities.append(needed if max_seq_len is None else max_seq_len)
    return capacities


def summary(result: dict, top: int = 12) -> str:
    unit = "µs"
    span = f", first to last kernel {result['span_us']:.0f} {unit}" if result.get("span_us") else ""
    lines = [f"--- {result['tree']}: {result['kernels_per_step']:.0f} kernels per step, "
             f"{result['us_per_step']:.0f} {unit} per step ({result['timing']}"
             f"{', CUDA graph' if result['cuda_graph'] else ''}){span}"]
    phases = result.get("phases")
    if phases:
        lines.append(f"  draft {phases['draft_kernels']} kernels {phases['draft_us']:.0f} {unit}, verify/accept/commit "
                     f"{phases['verify_kernels']} kernels {phases['verify_us']:.0f} {unit} (first to last kernel)")
    lines.append("  by kind: " + ", ".join(f"{kind} {v['kernels_per_step']:.0f} kernels {v['us_per_step']:.0f} {unit} "
                                           f"({v['share']:.0%})" for kind, v in result["by_kind"].items()))
    for row in result["kernels"][:top]:
        lines.append(f"  {row['us_per_step']:8.1f} {unit} {row['share']:5.1%} x{row['calls_per_step']:5.1f} "
                     f"[{row['kind']}] {row['name'][:110]}")
    return "\n".join(lines)


KIND_ORDER = ("gemm", "inductor", "specc", "other")
KIND_COLOURS = {"gemm": "#4c72b0", "inductor": "#55a868", "specc": "#c44e52", "other": "#8172b2"}


def plot_by_kind(reports: list[tuple[str, dict]], path: Path, figure_class) -> Path:
    """One horizontal bar per (report, configuration): kernel µs per step stacked by kind (kinds
    re-derived from the names with kernel_kind, so reports of older rules compare like for like),
    labelled with the kernel count. `reports`: (label, profile JSON) pairs, drawn in order."""
    bars = []
    for label, report in reports:
        for result in report["results"]:
            totals = dict.fromkeys(KIND_ORDER, 0.0)
            for row in result["kernels"]:
                totals[kernel_kind(row["name"])] += row["us_per_step"]
            bars.append((f"{result['tree']} ({label})" if label else result["tree"], totals, result["kernels_per_step"]))
    figure = figure_class(figsize=(8, 0.5 * len(bars) + 1.2))
    axes = figure.subplots()
    for index, (name, totals, kernels) in enumerate(reversed(bars)):
        left = 0.0
        for kind in KIND_ORDER:
            axes.barh(index, totals[kind], left=left, color=KIND_COLOURS[kind], label=kind if index == 0 else None)
            left += totals[kind]
        axes.text(left, index, f"  {kernels:.0f} kernels", va="center", fontsize=8)
    axes.set_yticks(range(len(bars)), [name for name, _, _ in reversed(bars)], fontsize=8)
    axes.set_xlabel("kernel time per step, µs (sum of device kernel durations)")
    axes.set_xlim(0, max(sum(t.values()) for _, t, _ in bars) * 1.2)
    axes.legend(loc="lower right", fontsize=8)
    environment_line = reports[-1][1].get("environment", {})
    axes.set_title(f"kernels per decode step by kind, {environment_line.get('gpu', 'CPU')}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--draft", default=None, help="EAGLE head .safetensors (default: the shipped head)")
    parser.add_argument("--model", default=None, help="a Llama GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", type=int, default=0, help="MT-Bench first-turn index")
    parser.add_argument("--trees", default="eagle;dynamic:8,8,64",
                        help="trees profiled after the plain step, separated by ';' (commas belong to a dynamic spec)")
    parser.add_argument("--steps", type=int, default=50, help="profiled steps per configuration")
    parser.add_argument("--warm-tokens", type=int, default=32, help="tokens decoded before profiling")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="cache capacity (default: just enough; `specc bench spec` at 256 tokens uses 2304)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-compile", action="store_true", help="run the rewritten programs without Inductor")
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--plot", default=None, help="PNG: kernel time per step by kind, one bar per configuration")
    parser.add_argument("--from", dest="reports", action="append", default=[], metavar="LABEL=REPORT",
                        help="plot saved profile reports instead of profiling (repeatable; 'before=a.json'); needs --plot")
    parser.set_defaults(func=cmd_profile)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("profile", help="the kernels of one decode step, plain and per tree: "
                                   "calls, µs, share, by kind (GPU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(parser)


def cmd_profile(args: argparse.Namespace) -> int:
    from specc.bench.acceptance_gap import load_model_and_head
    from specc.bench.end_to_end import load_prompts, parse_trees

    if args.reports:
        return _plot_saved_reports(args)
    try:
        trees = parse_trees(args.trees)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.steps < 1 or args.warm_tokens < 1:
        raise SystemExit(f"--steps {args.steps} --warm-tokens {args.warm_tokens}: give at least 1 of each")
    model, tokenizer, draft, dtype = load_model_and_head(args, args.dtype)
    prompt = load_prompts(tokenizer)[1][args.prompt]
    try:
        cache_capacities(prompt, ["plain", *trees], args.steps, args.warm_tokens, args.max_seq_len)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    results = run(model, draft, prompt, trees, args.steps, args.warm_tokens, compile=not args.no_compile,
                  log=lambda text: print(text, flush=True), max_seq_len=args.max_seq_len)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": environment(), "command": shlex.join(sys.argv),
                                              "dtype": str(dtype), "prompt": args.prompt, "results": results},
                                             indent=1))
    if args.plot:
        report = {"environment": environment(), "results": results}
        print(f"plot written: {_plot(args.plot, [('', report)])}")
    return 0


def _plot(path: str, reports: list[tuple[str, dict]]) -> Path | None:
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return plot_by_kind(reports, Path(path), Figure)


def _plot_saved_reports(args: argparse.Namespace) -> int:
    if not args.plot:
        raise SystemExit("--from plots saved reports: give --plot PNG too")
    reports = []
    for spec in args.reports:
        label, _, path = spec.rpartition("=")
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--from {spec}: cannot read a profile report there ({error})") from None
        if not isinstance(report, dict) or "results" not in report:
            raise SystemExit(f"--from {spec}: not a `specc bench profile` report (no 'results')")
        reports.append((label, report))
    print(f"plot written: {_plot(args.plot, reports)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specc bench profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return cmd_profile(configure_parser(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
