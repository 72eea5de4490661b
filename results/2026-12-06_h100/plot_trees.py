"""The tree study of 2026-12-06 as one picture: each tree's measured accept length against its
step time, over its run's plain step, from the three `specc bench spec` reports of this folder.

A tree's decode speedup over plain is accept / (step / plain step), so lines of equal speedup
are straight lines through the origin (the measured end-to-end ratio, prefill included, is
about 1% under them); a tree is better the further up and to the left it sits.
Reading the step time relative to each run's own plain step puts the three runs on one scale
(their caches differ: 2,560, 2,304 and 2,048 positions).

    python3 results/2026-12-06_h100/plot_trees.py   # writes trees_accept_vs_step.png beside it
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
RUNS = {"a": "spec_trees_a.json.xz", "b": "spec_trees_b.json.xz", "c": "spec_trees_c.json.xz"}
CHAT_TABLE = ",specc/assets/trees/smollm2-135m-instruct-eagle3-chat.json"


def tree_points() -> list[dict]:
    """One point per (run, tree): nodes, depth, accept, step over plain step, speedup."""
    points = []
    for run, name in RUNS.items():
        report = json.loads(lzma.open(HERE / name).read())
        configs = report["configurations"]
        plain = next(c for c in configs if c["decoder"] == "plain")
        plain_ms = 1e3 / plain["decode_tokens_per_second"]
        for c in configs:
            if c["decoder"] != "spec":
                continue
            step_ms = c["mean_accept_length"] * 1e3 / c["decode_tokens_per_second"]
            chat = c["tree"].endswith(CHAT_TABLE)
            nodes, depth = (int(v) for v in c["tree"].removesuffix(CHAT_TABLE).removeprefix("tuned:").split(","))
            points.append({"run": run, "tree": f"{'chat ' if chat else 'shipped '}{nodes},{depth}", "nodes": nodes,
                           "depth": depth, "accept": c["mean_accept_length"], "step_over_plain": step_ms / plain_ms,
                           "speedup": c["tokens_per_second"] / plain["tokens_per_second"]})
    return points


def plot(points: list[dict], path: Path) -> Path:
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    axes = figure.add_subplot()
    lo, hi = 1.30, 1.62
    for speedup in (2.3, 2.4, 2.5):
        axes.plot([lo, hi], [speedup * lo, speedup * hi], color="0.8", lw=0.8, zorder=0)
        axes.text(hi, speedup * hi, f" {speedup}x", va="center", fontsize=8, color="0.5")
    colors = {4: "tab:green", 5: "tab:orange", 6: "tab:blue"}
    markers = {"a": "o", "b": "s", "c": "^"}
    labelled = set()
    for p in points:
        axes.scatter(p["step_over_plain"], p["accept"], color=colors.get(p["depth"], "tab:gray"), marker=markers[p["run"]],
                     s=20 + p["nodes"] / 2, edgecolor="black" if p["tree"].startswith("shipped") else "none", zorder=2)
        if p["tree"] not in labelled:  # a tree measured in two runs is named once
            labelled.add(p["tree"])
            axes.annotate(p["tree"], (p["step_over_plain"], p["accept"]), fontsize=6.5, xytext=(4, 2),
                          textcoords="offset points")
    for depth, color in colors.items():
        axes.scatter([], [], color=color, label=f"depth {depth}")
    for run, marker in markers.items():
        axes.scatter([], [], color="0.4", marker=marker, label=f"run {run}")
    axes.set_xlim(lo, hi)
    axes.set_xlabel("speculative step / plain step (same run)")
    axes.set_ylabel("mean accept length (tokens per step)")
    axes.set_title("SmolLM2-135M, 80 MT-Bench first turns, greedy, batch 1, H100: trees side by side", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.savefig(path, dpi=130)
    return path


if __name__ == "__main__":
    pts = tree_points()
    for p in sorted(pts, key=lambda p: -p["speedup"]):
        print(f"run {p['run']}  {p['tree']:12s}  accept {p['accept']:.2f}  step/plain {p['step_over_plain']:.3f}  "
              f"x plain {p['speedup']:.2f}")
    print("plot written:", plot(pts, HERE / "trees_accept_vs_step.png"))
