"""`specc bench spec` with the draft layer's fused GEMMs off and on, one after the other in one
process (run from the repository root on the GPU machine):

    python3 results/2026-12-03d_h200/variant_spec.py OUT_DIR unfused fused [fold]

    unfused  SPECC_FUSE_DRAFT_LINEAR=0: the draft's norms, SwiGLU, residual adds and fc input
             by Inductor's kernels, its GEMMs by cuBLAS, as before this run (the default now)
    fused    SPECC_FUSE_DRAFT_LINEAR=1: specc::fused_linear (the GEMMs take their neighbours
             with them); the default while this ran (165e363), off by default after it
    fold     fused, and SPECC_ATTENTION_MERGE=fold: split attention merges in its last program
             (every attention call, the target's included, so plain decode changes too)

Each variant runs 80 MT-Bench first turns, greedy, 256 new tokens, bf16, `tuned:64,6`, with its
own plain decode side by side, and writes OUT_DIR/spec_<variant>.json. A variant that fails
prints its error and the next one runs.
"""

import os
import sys
import traceback

import torch

from specc.cli import main

SWITCH = {"unfused": {"SPECC_FUSE_DRAFT_LINEAR": "0", "SPECC_ATTENTION_MERGE": "kernel"},
          "fused": {"SPECC_FUSE_DRAFT_LINEAR": "1", "SPECC_ATTENTION_MERGE": "kernel"},
          "fold": {"SPECC_FUSE_DRAFT_LINEAR": "1", "SPECC_ATTENTION_MERGE": "fold"}}

out_dir, variants = sys.argv[1], sys.argv[2:]
for variant in variants:
    if variant not in SWITCH:
        raise SystemExit(f"variant {variant!r}: use one of {sorted(SWITCH)}")
for variant in variants:
    os.environ.update(SWITCH[variant])
    torch._dynamo.reset()
    try:
        main(["bench", "spec", "--out", f"{out_dir}/spec_{variant}.json", "--trees", "tuned:64,6", "--hf-prompts", "0",
              "--max-new-tokens", "256"])
    except Exception:  # noqa: BLE001  (report it and measure the next variant)
        traceback.print_exc()
        print(f"variant {variant} failed", flush=True)
