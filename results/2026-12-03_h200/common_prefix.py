"""Did the 16-row tiles lower the accept length, or did the text change? (CPU, from the JSON here)

    python3 results/2026-12-03_h200/common_prefix.py > results/2026-12-03_h200/common_prefix.log

The tenth run's main run against each of its variants, through `specc bench compare`
(specc/bench/accept_compare.py): accept lengths on the text both runs decoded.
"""

from pathlib import Path

from specc.bench.accept_compare import compare, load_report, summary

folder = Path(__file__).parent
base = load_report(folder / "spec.json.xz")
for other in ("spec_tiles", "spec_drafting"):
    print(f"A spec.json.xz, B {other}.json.xz:")
    print(summary(compare(base, load_report(folder / f"{other}.json.xz"), "tuned:64,6", "tuned:64,6")))
