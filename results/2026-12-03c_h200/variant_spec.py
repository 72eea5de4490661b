"""`specc bench spec` with the rotary fusion off and on, one after the other in one process (run
from the repository root on the GPU machine):

    python3 results/2026-12-03c_h200/variant_spec.py OUT_DIR unfused rotary

    unfused  SPECC_FUSE_ROTARY=0: q and k rotated by Inductor's kernels, as before this run
    rotary   the default: the attention ops rotate q and k as they load them

Each variant runs 80 MT-Bench first turns, greedy, 256 new tokens, bf16, `tuned:64,6`, with its
own plain decode side by side (the fusion changes plain decode too), and writes
OUT_DIR/spec_<variant>.json. A variant that fails prints its error and the next one runs.
"""

import os
import sys
import traceback

import torch

from specc.cli import main

SWITCH = {"unfused": "0", "rotary": "1"}

out_dir, variants = sys.argv[1], sys.argv[2:]
for variant in variants:
    if variant not in SWITCH:
        raise SystemExit(f"variant {variant!r}: use one of {sorted(SWITCH)}")
for variant in variants:
    os.environ["SPECC_FUSE_ROTARY"] = SWITCH[variant]
    torch._dynamo.reset()
    try:
        main(["bench", "spec", "--out", f"{out_dir}/spec_{variant}.json", "--trees", "tuned:64,6", "--hf-prompts", "0",
              "--max-new-tokens", "256"])
    except Exception:  # noqa: BLE001  (report it and measure the next variant)
        traceback.print_exc()
        print(f"variant {variant} failed", flush=True)
