"""Time specc::topk's two launches per stage-1 chunk and warps, at the step's shapes (GPU);
int32 keys (topk_triton.NARROW_KEYS, the default for 16-bit x since 2026-12-07) at every
setting, int64 keys (before) at the default chunk.

    python3 scripts/topk_bench.py --out topk_bench.json

Shapes are those of a batch-1 step with the shipped head: the draft's four levels of
`tuned-chat:64,4` (1, 12, 18 and 17 rows of the 16,384-token draft vocabulary; top 12, 8, 5
and 4), the verifier's argmax over 65 rows of the 49,152-token vocabulary (top 1), and plain
decode's argmax over one row. Stage 1 does k serial max reductions over its chunk, so a wide
chunk (4,096 keys over 4 warps, the default) pays k block-wide reductions with barriers, while a
narrow one pays more programs and a longer merge; which wins is what this measures ("default"
is `default_chunk`'s choice: 4,096 in four warps until 2026-12-06, when this chose 512 and
1,024 in one warp).
Each setting is captured as REPEATS back-to-back calls in one CUDA graph and replayed (median,
µs per call), and its indices are checked against the reference. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from specc.bench.common import graph_us_per_call
from specc.lowering.topk import topk_reference
from specc.lowering import topk_triton as topk_module
from specc.lowering.topk_triton import _num_warps, default_chunk, topk_triton

# name: (rows, V, k)
SHAPES = {
    "draft level 1": (1, 16384, 12),
    "draft level 2": (12, 16384, 8),
    "draft level 3": (18, 16384, 5),
    "draft level 4": (17, 16384, 4),
    "verify argmax": (65, 49152, 1),
    "plain argmax": (1, 49152, 1),
}
CHUNKS = (256, 512, 1024, 2048, 4096)
REPEATS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="topk_bench.json")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": REPEATS, "shapes": []}
    for name, (rows, n_cols, k) in SHAPES.items():
        # logits-like values; bf16 makes ties common, which the check covers
        x = (4 * torch.randn(rows, n_cols, generator=gen, device=device)).to(dtype)
        want = topk_reference(x, k)[1]
        timings = []
        saved = topk_module.NARROW_KEYS
        for narrow in (True, False):  # int32 keys, then int64 keys
            topk_module.NARROW_KEYS = narrow
            try:
                for chunk in CHUNKS if narrow else (default_chunk(n_cols, k),):
                    for warps in sorted({_num_warps(chunk), max(1, _num_warps(chunk) // 2), min(8, 2 * _num_warps(chunk))}):
                        got = topk_triton(x, k, chunk=chunk, warps=warps)[1]
                        us = graph_us_per_call(lambda: topk_triton(x, k, chunk=chunk, warps=warps), calls=REPEATS, replays=30)
                        timings.append({"keys": "int32" if narrow else "int64", "chunk": chunk, "warps": warps, "us": us,
                                        "equal": bool(torch.equal(got, want))})
            finally:
                topk_module.NARROW_KEYS = saved
        best = min(timings, key=lambda t: t["us"])

        def default_of(keys: str) -> dict:
            return next(t for t in timings if t["keys"] == keys and t["chunk"] == default_chunk(n_cols, k)
                        and t["warps"] == _num_warps(t["chunk"]))

        default, wide = default_of("int32"), default_of("int64")
        results["shapes"].append({"name": name, "rows": rows, "n_cols": n_cols, "k": k, "timings": timings})
        cells = "  ".join(f"{t['keys'][3:]}:{t['chunk']}/{t['warps']}w {t['us']:5.2f}{'' if t['equal'] else ' WRONG'}"
                          for t in timings)
        print(f"{name:14s} rows {rows:3d} V {n_cols} k {k:2d}: default chunk, int32 keys {default['us']:5.2f} µs, "
              f"int64 keys {wide['us']:5.2f}; best {best['keys']} {best['chunk']}/{best['warps']}w {best['us']:5.2f} µs | {cells}",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
