"""Did the 16-row tiles lower the accept length, or did the text change? (CPU, from the JSON here)

    python3 results/2026-12-03_h200/common_prefix.py [results/2026-12-03_h200]

For two speculative runs of the same prompts, greedy, the accept lengths can only differ on the
same text if the drafts differ. Each pair of runs here decodes identical tokens up to some
point per prompt (both are the model's greedy output; they part at bf16 near-ties). This
compares the mean accept length of the steps that end inside that common text, run against run,
and counts the plain decodes that differ between the runs.
"""

import json
import lzma
import sys
from pathlib import Path

folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)


def load(name: str) -> dict:
    with lzma.open(folder / f"{name}.json.xz") as handle:
        return json.load(handle)


def configuration(run: dict, decoder: str) -> dict:
    return next(c for c in run["configurations"] if c["decoder"] == decoder)


def tokens(run: dict, index: int) -> list[int]:
    spec = configuration(run, "spec")["per_prompt"][index]
    # a speculative output equal to plain is stored once, under plain
    return spec["tokens"] if "tokens" in spec else configuration(run, "plain")["per_prompt"][index]["tokens"]


def steps_within(accepts: list[int], length: int) -> tuple[int, int]:
    steps = covered = 0
    for accept in accepts:
        if covered + accept > length:
            break
        covered += accept
        steps += 1
    return steps, covered


runs = {name: load(name) for name in ("spec", "spec_tiles", "spec_drafting")}
base = runs["spec"]
for other in ("spec_tiles", "spec_drafting"):
    totals = {"spec": [0, 0], other: [0, 0]}
    common = differing = 0
    plain_differs = sum(a["tokens"] != b["tokens"] for a, b in zip(configuration(base, "plain")["per_prompt"],
                                                                   configuration(runs[other], "plain")["per_prompt"]))
    for index in range(len(base["prompts"])):
        mine, theirs = tokens(base, index), tokens(runs[other], index)
        length = next((p for p, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
        common += length
        accepts = {}
        for name in totals:
            run_accepts = configuration(runs[name], "spec")["per_prompt"][index]["accept_lengths"]
            steps, covered = steps_within(run_accepts, length)
            totals[name][0] += steps
            totals[name][1] += covered
            accepts[name] = run_accepts[:steps]
        shared = min(len(a) for a in accepts.values())
        differing += accepts["spec"][:shared] != accepts[other][:shared]
    print(f"spec vs {other}: plain outputs differ on {plain_differs}/80 prompts; common text {common} tokens; "
          f"accept on it: spec {totals['spec'][1] / totals['spec'][0]:.3f} over {totals['spec'][0]} steps, "
          f"{other} {totals[other][1] / totals[other][0]:.3f} over {totals[other][0]} steps; "
          f"prompts whose step-by-step accepts differ on it: {differing}")
