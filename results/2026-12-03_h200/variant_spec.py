"""`specc bench spec` with one of this run's changes undone in-process, to attribute the accept
length (run from the repository root on the GPU machine):

    python3 results/2026-12-03_h200/variant_spec.py drafting OUT.json   # every node each draft level, features fused before the path gather
    python3 results/2026-12-03_h200/variant_spec.py tiles OUT.json      # the 128-row tree-attention tiles of split launches
"""

import sys

import torch

import specc.lowering.tree_attention_triton as attention
import specc.passes.speculative_step as step
from specc.cli import main

variant, out = sys.argv[1], sys.argv[2]
if variant == "drafting":
    step.TreePlan.level_ordered = property(lambda self: False)

    def fused_then_gathered(draft, final_hidden, layer_outputs, path):
        rows = torch.arange(path.shape[0], device=path.device)[:, None]
        return step.draft_features(draft, final_hidden, layer_outputs)[rows, path]

    step.path_features = fused_then_gathered
elif variant == "tiles":
    attention._decode_blocks = lambda rows, head_dim: attention._choose_blocks(rows, head_dim, torch.bfloat16)
else:
    raise SystemExit(f"variant {variant!r}: use 'drafting' or 'tiles'")
sys.exit(main(["bench", "spec", "--out", out, "--trees", "tuned:64,6", "--hf-prompts", "0", "--max-new-tokens", "256"]))
