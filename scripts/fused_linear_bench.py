"""Time specc::fused_linear against what it replaces, at the draft layer's shapes (GPU).

    python3 scripts/fused_linear_bench.py --out fused_linear.json

For each GEMM of SmolLM2's draft layer (fc with its embedding gather, q/k/v with the input norm,
o with the residual add, gate/up with the post-attention norm, down with the SwiGLU and the
residual add, the LM head's 16,384 draft-vocabulary rows with the final norm) and each row count
(7: the catch-up's pending inputs; 52: the widest level forward of `tuned:64,6`):
  unfused  the same math compiled by torch.compile (Inductor's pointwise/norm kernel + cuBLAS),
  fused    the kernel with its default tiles and a few others.
Each is captured as REPEATS back-to-back calls in one CUDA graph and replayed; the time is the
median over replays divided by REPEATS (µs per call). The weights stay in L2 across calls, as
they do across the draft's levels within a step. Prints one line per shape and writes JSON.
The unfused side is the math compiled on its own, which Inductor may compile differently from
the whole step (at 52 rows it ran gate/up and the LM head far slower than the step does:
results/2026-12-03d_h200/README.md); `specc bench profile` gives the step's own kernel times.
"""

from __future__ import annotations

import argparse
import json

import torch

from specc.bench.common import graph_us_per_call
from specc.lowering.fused_linear import fused_linear_reference
from specc.lowering.fused_linear_triton import default_blocks, fused_linear_triton

# name: (N, K, gate, norm, residual, embed)
SHAPES = {
    "fc": (576, 1152, False, False, False, 576),
    "qkv": (960, 576, False, True, False, 0),
    "o": (576, 576, False, False, True, 0),
    "gate_up": (3072, 576, False, True, False, 0),
    "down": (576, 1536, True, False, True, 0),
    "lm_head": (16384, 576, False, True, False, 0),
}
# (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M is the default's (all rows in one tile)
TILES = [(16, 64, 4, 3), (16, 128, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 2), (32, 64, 4, 4)]
REPEATS = 20


def graph_time(fn) -> float:
    """µs per call of fn, from REPEATS calls captured in one CUDA graph (median of 30 replays)."""
    return graph_us_per_call(fn, calls=REPEATS, replays=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="fused_linear.json")
    parser.add_argument("--rows", default="7,52")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": REPEATS, "shapes": []}
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (n, k, gate, norm, residual, embed) in SHAPES.items():
            def randn(*shape, scale=1.0):
                return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

            x = randn(rows, 2 * k if gate else k - embed)
            weight = randn(n, k, scale=k**-0.5)
            norm_weight = (1 + randn(k, scale=0.2)) if norm else None
            res = randn(rows, n) if residual else None
            tokens = torch.randint(0, 49152, (rows,), generator=gen, device=device) if embed else None
            embed_weight = randn(49152, embed) if embed else None
            compiled = torch.compile(fused_linear_reference, dynamic=False)
            row = {"shape": name, "rows": rows, "n": n, "k": k,
                   "unfused_us": graph_time(lambda: compiled(x, weight, norm_weight, 1e-5, gate, res, tokens, embed_weight))}
            default = default_blocks(rows, n, k)
            row["default_blocks"] = list(default)
            row["fused_default_us"] = graph_time(
                lambda: fused_linear_triton(x, weight, norm_weight, 1e-5, gate, res, tokens, embed_weight))
            row["fused_tiles_us"] = {}
            for block_n, block_k, warps, stages in TILES:
                blocks = (default[0], block_n, block_k, warps, stages)
                row["fused_tiles_us"][",".join(map(str, blocks))] = graph_time(
                    lambda: fused_linear_triton(x, weight, norm_weight, 1e-5, gate, res, tokens, embed_weight,
                                                blocks=blocks))
            best = min(row["fused_tiles_us"], key=row["fused_tiles_us"].get)
            print(f"{name:8s} rows {rows:3d}: unfused {row['unfused_us']:6.2f} µs  fused (default "
                  f"{','.join(map(str, default))}) {row['fused_default_us']:6.2f} µs  best {best} "
                  f"{row['fused_tiles_us'][best]:6.2f} µs", flush=True)
            results["shapes"].append(row)
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
