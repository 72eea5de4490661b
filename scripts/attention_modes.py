"""Time specc::tree_attention's two launch modes side by side on the GPU (not a test).

split: flash-decoding chunks of the prefix plus the tree pass, then the merge kernel (two
launches); fold: the same split, merged by each tile's last program, with chunks of at least
256 keys (one launch; SPECC_ATTENTION_MERGE=fold); fused: one program per (row tile, sequence,
KV head) streams prefix and tree through one online softmax (one launch). `tree_attention_triton` picks split whenever the row tiles
alone give under ~2 programs per SM (1.5 with several row tiles per KV head) and the cache's
capacity exceeds one 256-key chunk, from static shapes only; this measures what each mode costs at the context a decode step actually
sees, for SmolLM2's heads (Hq 9, Hkv 3, D 64) and Llama-3-8B's (32, 8, 128), batch 1, bf16.

    python3 scripts/attention_modes.py --out attention_modes.json

Each figure is the median of 20 CUDA-graph replays of 50 back-to-back calls, in µs per call.
"""

from __future__ import annotations

import argparse
import json

import torch

from specc.bench.common import graph_us_per_call
from specc.lowering.tree_attention_triton import tree_attention_triton

SHAPES = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="128,256,512,1024,2048,4096,8192")
    parser.add_argument("--nodes", default="1,26,64")
    parser.add_argument("--capacity", type=int, default=8192 + 128, help="cache positions (sets the split count)")
    parser.add_argument("--splits", default="", help="also time the split with these prefix chunk counts, e.g. 1,2,4")
    parser.add_argument("--out", default="attention_modes.json")
    args = parser.parse_args()
    fixed_splits = [(f"split{n}", int(n), False) for n in args.splits.split(",") if n]
    device = torch.device("cuda")
    rows = []
    for shape, (n_heads, n_kv, head_dim) in SHAPES.items():
        k_cache = torch.randn(1, 1, n_kv, args.capacity, head_dim, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        for steps in map(int, args.nodes.split(",")):
            q = torch.randn(1, n_heads, steps, head_dim, device=device, dtype=torch.bfloat16)
            mask = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()[None]
            out = torch.empty_like(q)
            for context in map(int, args.contexts.split(",")):
                if context + steps > args.capacity:
                    continue
                cache_len = torch.tensor([context], device=device)
                row = {"shape": shape, "nodes": steps, "context": context}
                for mode, splits, fold in [("default", None, False), ("fold", None, True), ("fused", 0, False), *fixed_splits]:
                    row[f"{mode}_us"] = graph_us_per_call(lambda s=splits, f=fold: tree_attention_triton(
                        q, k_cache, v_cache, 0, cache_len, mask, head_dim**-0.5, out=out, num_splits=s, fold_merge=f))
                rows.append(row)
                print(f"{shape:13s} N={steps:3d} context={context:5d}  default (split) {row['default_us']:6.2f} µs  "
                      f"fold {row['fold_us']:6.2f} µs  fused {row['fused_us']:6.2f} µs"
                      + "".join(f"  {m} {row[m + '_us']:6.2f} µs" for m, _, _ in fixed_splits), flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "capacity": args.capacity, "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
