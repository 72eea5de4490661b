"""`specc bench spec` with one of this run's changes undone in-process, each variant after the
other in one process (run from the repository root on the GPU machine):

    python3 results/2026-12-03b_h200/variant_spec.py OUT_DIR none split merge

    split  split launches with several row tiles aim at 2 programs per SM again (not 1.5)
    merge  the merge kernel loops over the parts at run time again (not unrolled, loads up front)
    none   this run's code

Each variant runs 80 MT-Bench first turns, greedy, 256 new tokens, bf16, `tuned:64,6`, with its
own plain decode side by side, and writes OUT_DIR/spec_<variant>.json.
"""

import sys
from contextlib import contextmanager

import torch

import specc.lowering.tree_attention_triton as attention
from specc.cli import main


_TEMPLATE = attention.TREE_ATTENTION_TEMPLATE
_MERGE_KERNEL = _TEMPLATE.index("def tree_attention_merge_kernel(")
_END = "    out = acc / tl.where(weight_sum > 0.0, weight_sum, 1.0)[:, None]\n"
_UNROLLED = _TEMPLATE[_TEMPLATE.index("    lse_max = tl.full([ROWS]", _MERGE_KERNEL):_TEMPLATE.index(_END, _MERGE_KERNEL) + len(_END)]
_LOOPED = '    out = _merge_partials(lse_rows, o_rows, row_ok, d_ok, NUM_PARTS, stride_ls, stride_ps, ROWS, "")\n'


@contextmanager
def undone(variant: str):
    saved = (attention._TILES_WAVES, attention.TREE_ATTENTION_TEMPLATE)
    if variant == "split":
        attention._TILES_WAVES = attention._ONE_TILE_WAVES
    elif variant == "merge":
        attention.TREE_ATTENTION_TEMPLATE = attention.TREE_ATTENTION_TEMPLATE.replace(_UNROLLED, _LOOPED)
    elif variant != "none":
        raise SystemExit(f"variant {variant!r}: use split, merge or none")
    try:
        yield
    finally:
        attention._TILES_WAVES, attention.TREE_ATTENTION_TEMPLATE = saved


out_dir, variants = sys.argv[1], sys.argv[2:]
for variant in variants:
    with undone(variant):
        torch._dynamo.reset()
        main(["bench", "spec", "--out", f"{out_dir}/spec_{variant}.json", "--trees", "tuned:64,6", "--hf-prompts", "0",
              "--max-new-tokens", "256"])
