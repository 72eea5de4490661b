"""Time specc::kv_write_attention's one launch against kv_write + tree_attention (GPU).

    python3 scripts/kv_write_attention_bench.py --out kv_write_attention_bench.json

Each layer of a step writes its new tokens' K/V into the cache, then attends over the cache.
`apart` is those two launches (kv_write_triton, then tree_attention_triton with its merge
launch when it splits); `fused` is tree_attention_triton with new_kv (the kernel's WRITE_KV),
which stores the K/V from the launch that attends (write_kv_in_launch=True: whatever
MAX_WRITE_KV_ROW_TILES would choose). Shapes: SmolLM2's heads (9 query, 3 KV,
D = 64) at a batch-1 step's row counts (plain decode's 1 token, the draft's levels of 12 and 18
nodes, the verify pass's 65) and contexts over MT-Bench's range, in the benchmark's cache of
2,304 positions; and Llama-3-8B's heads (32, 8, D = 128) at 1 and 65 tokens over 1,024. q and
the new k arrive before their rotation, as the rotary_fusion pass hands them over.

Each variant is captured as REPEATS back-to-back calls in one CUDA graph (median µs per call);
before timing, the fused launch's caches are checked against the two launches' (V equal, K
within rounding) and its output against theirs. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from specc.bench.common import graph_us_per_call
from specc.lowering.kv_write_triton import kv_write_triton
from specc.lowering.tree import ancestor_mask
from specc.lowering.tree_attention_triton import tree_attention_triton

# name: (query heads, KV heads, head dim, cache capacity, [(new tokens, context), ...])
SHAPES = {
    "smollm2": (9, 3, 64, 2304, [(t, c) for t in (1, 12, 18, 65) for c in (300, 1200, 2200)]),
    "llama3-8b": (32, 8, 128, 2304, [(1, 1024), (65, 1024)]),
}
REPEATS = 30


def _case(n_heads: int, n_kv: int, head_dim: int, capacity: int, steps: int, context: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dtype = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q = randn(1, steps, n_heads, head_dim).transpose(1, 2)  # the projection's layout
    k = randn(1, steps, n_kv, head_dim).transpose(1, 2)
    v = randn(1, steps, n_kv, head_dim).transpose(1, 2)
    k_cache, v_cache = randn(1, 1, n_kv, capacity, head_dim), randn(1, 1, n_kv, capacity, head_dim)
    cache_len = torch.tensor([context], dtype=torch.int64, device="cuda")
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen, device="cuda")) for i in range(1, steps)]
    mask = ancestor_mask(torch.tensor([parents], dtype=torch.int32, device="cuda"))
    positions = context + torch.arange(steps, device="cuda")  # depth would do; any positions time the same
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device="cuda") / head_dim)
    angles = (positions[:, None].float() * inv_freq).repeat(1, 2)[None]
    return q, k, v, k_cache, v_cache, cache_len, mask.contiguous(), angles.cos().to(dtype), angles.sin().to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="kv_write_attention_bench.json")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
               "repeats": REPEATS, "cases": []}
    print(f"{results['gpu']}, torch {torch.__version__}, bf16, {REPEATS} calls per CUDA graph")
    print(f"{'shape':10} {'tokens':>6} {'context':>7} {'apart us':>9} {'fused us':>9} {'fused/apart':>11}")
    for name, (n_heads, n_kv, head_dim, capacity, points) in SHAPES.items():
        scale = head_dim**-0.5
        for seed, (steps, context) in enumerate(points):
            q, k, v, k_cache, v_cache, cache_len, mask, cos, sin = _case(n_heads, n_kv, head_dim, capacity, steps,
                                                                         context, seed)
            apart_k, apart_v = k_cache.clone(), v_cache.clone()
            out_apart, out_fused = torch.empty_like(q), torch.empty_like(q)

            def apart():
                kv_write_triton(apart_k, apart_v, 0, k, v, cache_len, cos, sin)
                tree_attention_triton(q, apart_k, apart_v, 0, cache_len, mask, scale, out=out_apart,
                                      rope_cos=cos, rope_sin=sin)

            def fused():
                tree_attention_triton(q, k_cache, v_cache, 0, cache_len, mask, scale, out=out_fused,
                                      rope_cos=cos, rope_sin=sin, new_kv=(k, v), write_kv_in_launch=True)

            apart()
            fused()
            torch.cuda.synchronize()
            v_equal = bool(torch.equal(v_cache, apart_v))
            k_error = (k_cache.float() - apart_k.float()).abs().max().item()
            out_error = ((out_fused.float() - out_apart.float()).norm() / out_apart.float().norm()).item()
            if not v_equal or k_error > 0.02 or out_error > 0.01:
                raise SystemExit(f"{name} tokens {steps} context {context}: the fused launch disagrees with the two "
                                 f"launches (V equal: {v_equal}, K max error {k_error:.3g}, output relative error "
                                 f"{out_error:.3g}); timings of a wrong kernel mean nothing")
            apart_us = graph_us_per_call(apart, calls=REPEATS, replays=30)
            fused_us = graph_us_per_call(fused, calls=REPEATS, replays=30)
            results["cases"].append({"shape": name, "tokens": steps, "context": context, "apart_us": apart_us,
                                     "fused_us": fused_us, "k_max_error": k_error, "out_relative_error": out_error})
            print(f"{name:10} {steps:6d} {context:7d} {apart_us:9.2f} {fused_us:9.2f} {fused_us / apart_us:11.2f}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
