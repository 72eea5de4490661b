"""Two speculative runs' accept lengths on the text both decoded (`specc bench compare`, CPU).

Greedy speculative decoding is lossless, so two runs of the same prompts write the target's
greedy text; in bf16 they still part where a logit near-tie falls the other way (a kernel that
sums in another order is enough, in the prefill as much as in the step). After that point each
run decodes its own text, and the mean accept length over 80 prompts moves with it (by up to
0.14 between three runs on an H200, BENCHMARKS.md, eleventh run). So a change of that size says
nothing about the draft until the runs are compared on the text they share: per prompt, the tokens up to the first one that differs, and the steps
of each run that end inside them. On shared text, equal drafts accept alike step for step.

    specc bench compare A/spec.json B/spec.json.xz [--tree tuned:64,6] [--tree-b ...] [--batch 1]

reads two `specc bench spec` reports (plain `.json` or `.json.xz`) and prints, for one
speculative configuration of each, the mean accept length on the shared text, the steps it
covers, the prompts whose step-by-step accepts differ there, and how many plain outputs differ
between the runs (the text moving under the runs, not the draft).
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path


def load_report(path: str | Path) -> dict:
    """A `specc bench spec` JSON report, plain or xz-compressed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no report at {path}; give the --out file of a `specc bench spec` run")
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def configuration(report: dict, decoder: str, tree: str | None = None, batch: int = 1) -> dict:
    """The report's configuration of this decoder (and tree, for "spec") at this batch size."""
    found = [c for c in report["configurations"] if c["decoder"] == decoder and c["batch"] == batch
             and (tree is None or c.get("tree") == tree)]
    if len(found) != 1:
        have = sorted({f"{c['decoder']}:{c.get('tree')}:b{c['batch']}" for c in report["configurations"]})
        raise ValueError(f"the report has {len(found)} configurations for decoder={decoder!r} tree={tree!r} "
                         f"batch={batch} (it has {', '.join(have)}); name one with --tree / --batch")
    return found[0]


def spec_rows(spec: dict, plain: dict[int, list[int]]) -> dict[int, dict]:
    """Prompt index -> {"tokens", "accept_lengths"} of a speculative configuration, tokens
    restored from `plain` (index -> tokens) where the report stored them once (outputs equal to
    plain)."""
    return {row["index"]: {"tokens": row["tokens"] if "tokens" in row else plain[row["index"]],
                           "accept_lengths": row["accept_lengths"]} for row in spec["per_prompt"]}


def _plain_tokens(report: dict, batch: int) -> dict[int, list[int]]:
    return {row["index"]: row["tokens"] for row in configuration(report, "plain", None, batch)["per_prompt"]}


def steps_within(accept_lengths: list[int], length: int) -> list[int]:
    """The leading steps whose tokens all lie in the first `length` output tokens."""
    covered = 0
    for step, accept in enumerate(accept_lengths):
        if covered + accept > length:
            return accept_lengths[:step]
        covered += accept
    return list(accept_lengths)


def shared_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(report_a: dict, report_b: dict, tree_a: str | None = None, tree_b: str | None = None,
            batch: int = 1) -> dict:
    """Accept lengths of two runs' speculative configurations on the text both decoded."""
    spec_a, spec_b = configuration(report_a, "spec", tree_a, batch), configuration(report_b, "spec", tree_b, batch)
    plain_a, plain_b = _plain_tokens(report_a, batch), _plain_tokens(report_b, batch)
    rows_a, rows_b = spec_rows(spec_a, plain_a), spec_rows(spec_b, plain_b)
    prompts = sorted(rows_a.keys() & rows_b.keys())
    if not prompts:
        raise ValueError("the two reports share no prompt index; compare runs of the same prompt file")
    shared = 0
    steps = {"a": [], "b": []}
    differing = []
    for index in prompts:
        length = shared_length(rows_a[index]["tokens"], rows_b[index]["tokens"])
        shared += length
        mine = steps_within(rows_a[index]["accept_lengths"], length)
        theirs = steps_within(rows_b[index]["accept_lengths"], length)
        steps["a"] += mine
        steps["b"] += theirs
        common = min(len(mine), len(theirs))
        if mine[:common] != theirs[:common]:
            differing.append(index)

    def mean(values: list[int]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "prompts": len(prompts),
        "plain_outputs_differing": sum(plain_a[i] != plain_b[i] for i in prompts if i in plain_a and i in plain_b),
        "shared_tokens": shared,
        "a": {"tree": tree_a, "steps": len(steps["a"]), "accept_on_shared_text": mean(steps["a"]),
              "accept_overall": spec_a["mean_accept_length"]},
        "b": {"tree": tree_b, "steps": len(steps["b"]), "accept_on_shared_text": mean(steps["b"]),
              "accept_overall": spec_b["mean_accept_length"]},
        "prompts_with_differing_accepts_on_shared_text": differing,
    }


def summary(result: dict) -> str:
    a, b = result["a"], result["b"]

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    return (f"{result['prompts']} prompts; plain outputs differ on {result['plain_outputs_differing']}; "
            f"shared text {result['shared_tokens']} tokens\n"
            f"  A: accept {fmt(a['accept_on_shared_text'])} on it over {a['steps']} steps (overall {fmt(a['accept_overall'])})\n"
            f"  B: accept {fmt(b['accept_on_shared_text'])} on it over {b['steps']} steps (overall {fmt(b['accept_overall'])})\n"
            f"  prompts whose step-by-step accepts differ on it: {len(result['prompts_with_differing_accepts_on_shared_text'])}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help="two `bench spec` reports' accept lengths on the text both "
                                   "decoded (CPU)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a `specc bench spec` report (.json or .json.xz)")
    parser.add_argument("b", help="another one, of the same prompts")
    parser.add_argument("--tree", default=None, help="the speculative configuration of A (and of B unless --tree-b); "
                        "needed when a report has several")
    parser.add_argument("--tree-b", default=None, help="B's configuration, when it differs from A's")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    parser.set_defaults(func=cmd_compare)
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    tree_b = args.tree_b if args.tree_b is not None else args.tree
    try:
        result = compare(load_report(args.a), load_report(args.b), args.tree, tree_b, args.batch)
    except ValueError as error:  # a report without (or with several) such configurations: say which
        raise SystemExit(f"specc bench compare: {error}") from None
    result["reports"] = [str(args.a), str(args.b)]
    print(summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0
