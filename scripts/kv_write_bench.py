"""Time specc::kv_write's launch settings against each other (GPU), and what rotating q costs
tree attention.

    python3 scripts/kv_write_bench.py --out kv_write_bench.json

A step's kv_write rotates its new K and stores K and V into the cache: 1 token in plain
decode, a draft level's nodes, the verify pass's 65. In the eighteenth run's profile a verify
kv_write took 2.11 µs against plain's 1.35 (the rule before launch_settings, "tiles16"). This
compares, at SmolLM2's heads (3 KV heads, D = 64) and Llama-3-8B's (8, D = 128):
- the rotation's form: `halves` (two contiguous half tiles) against `partner` (the whole tile
  and a partner tile gathered at d +- D/2);
- tokens per program (block_t 1-16) and warps per program (1, 2, 4).
Every setting's caches are checked against the reference (kv_write_reference on the rotated K)
before it is timed; `halves` is also compared bit for bit with `partner`. Each setting is
captured as REPEATS calls in one CUDA graph (median µs per call of 30 replays).

Then tree attention with q rotated inside the kernel (rope_cos/rope_sin) against the same call
given q already rotated: what the rotation on load costs at 1 and 65 queries. (A form that built
rotate_half(q) from the loaded tile with reshape/permute/split/join, instead of the second,
gathering load, was timed here at commit 4a9c0a2 and was slower at every shape: 1.11-1.18x the
given-q call against 1.01-1.13x, results/2026-12-06e_h100/kv_write_bench_call2.log; removed.)
Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from specc.bench.common import graph_us_per_call
from specc.lowering.kv_write import kv_write_reference
from specc.lowering.kv_write_triton import kv_write_triton, launch_settings
from specc.lowering.rotary import rotate_reference
from specc.lowering.tree import ancestor_mask
from specc.lowering.tree_attention_triton import tree_attention_triton

# name: (query heads, KV heads, head dim, cache capacity, context, new-token counts)
SHAPES = {
    "smollm2": (9, 3, 64, 2304, 600, (1, 5, 12, 18, 65)),
    "llama3-8b": (32, 8, 128, 2304, 1024, (1, 65)),
}
REPEATS = 30


def _tables(steps: int, head_dim: int, context: int, dtype: torch.dtype):
    positions = context + torch.arange(steps, device="cuda")
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device="cuda") / head_dim)
    angles = (positions[:, None].float() * inv_freq).repeat(1, 2)[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _settings(steps: int):
    largest = min(16, 1 << max(0, steps - 1).bit_length())
    blocks = [b for b in (1, 2, 4, 8, 16) if b <= largest]
    return [dict(halves=h, block_t=b, num_warps=w) for h, b, w in itertools.product((False, True), blocks, (1, 2, 4))]


def _kv_write_cases(results: dict) -> None:
    print(f"{'shape':10} {'tokens':>6} {'tiles16 us':>10} {'rule us':>8} {'best us':>8}  best setting "
          f"(rule: launch_settings; tiles16: the rule before it)")
    dtype = torch.bfloat16
    for name, (_, n_kv, head_dim, capacity, context, token_counts) in SHAPES.items():
        for steps in token_counts:
            gen = torch.Generator(device="cuda").manual_seed(steps)
            k = torch.randn(1, steps, n_kv, head_dim, generator=gen, device="cuda").to(dtype).transpose(1, 2)
            v = torch.randn(1, steps, n_kv, head_dim, generator=gen, device="cuda").to(dtype).transpose(1, 2)
            cos, sin = _tables(steps, head_dim, context, dtype)
            cache_len = torch.tensor([context], dtype=torch.int64, device="cuda")
            k_cache = torch.randn(1, 1, n_kv, capacity, head_dim, generator=gen, device="cuda").to(dtype)
            v_cache = torch.randn_like(k_cache)
            want_k, want_v = k_cache.clone(), v_cache.clone()
            kv_write_reference(want_k, 0, rotate_reference(k.float(), cos.float(), sin.float()), cache_len)
            kv_write_reference(want_v, 0, v, cache_len)
            rule, old_rule = launch_settings(steps, head_dim), launch_settings(steps, head_dim, "tiles16")
            timings, written = [], {}
            for setting in _settings(steps):
                got_k, got_v = k_cache.clone(), v_cache.clone()
                kv_write_triton(got_k, got_v, 0, k, v, cache_len, cos, sin, **setting)
                torch.cuda.synchronize()
                k_error = (got_k.float() - want_k.float()).abs().max().item()
                if not torch.equal(got_v, want_v) or k_error > 0.02:
                    raise SystemExit(f"{name} tokens {steps} {setting}: the cache disagrees with the reference (V equal: "
                                     f"{torch.equal(got_v, want_v)}, K max error {k_error:.3g}); its timing would mean nothing")
                written[(setting["halves"], setting["block_t"], setting["num_warps"])] = got_k
                us = graph_us_per_call(lambda: kv_write_triton(got_k, got_v, 0, k, v, cache_len, cos, sin, **setting),
                                       calls=REPEATS, replays=30)
                timings.append({**setting, "us": us, "k_max_error": k_error})
            halves_equal = all(torch.equal(written[(True, b, w)], written[(False, b, w)])
                               for (h, b, w) in written if h)
            rule_us = next(t["us"] for t in timings if all(t[key] == rule[key] for key in rule))
            old_us = next(t["us"] for t in timings if all(t[key] == old_rule[key] for key in old_rule))
            best = min(timings, key=lambda t: t["us"])
            results["kv_write"].append({"shape": name, "tokens": steps, "context": context, "rule": rule,
                                        "rule_us": rule_us, "tiles16_rule": old_rule, "tiles16_us": old_us,
                                        "halves_bit_equal_to_partner": halves_equal, "settings": timings})
            form = "halves" if best["halves"] else "partner"
            print(f"{name:10} {steps:6d} {old_us:10.2f} {rule_us:8.2f} {best['us']:8.2f}  {form}, block_t "
                  f"{best['block_t']}, {best['num_warps']} warps (halves bit-equal to partner: {halves_equal})")
            for block_t in sorted({t["block_t"] for t in timings}):
                row = [t for t in timings if t["block_t"] == block_t]
                cells = " ".join(f"{'h' if t['halves'] else 'p'}{t['num_warps']}:{t['us']:5.2f}" for t in row)
                print(f"{'':18} block_t {block_t:2d}  {cells}")


def _attention_cases(results: dict) -> None:
    print(f"\n{'shape':10} {'queries':>7} {'context':>7} {'rotated in us':>13} {'given us':>9} {'in/given':>8}")
    dtype = torch.bfloat16
    for name, (n_heads, n_kv, head_dim, capacity, context, _) in SHAPES.items():
        for steps in (1, 65):
            gen = torch.Generator(device="cuda").manual_seed(steps)
            q = torch.randn(1, steps, n_heads, head_dim, generator=gen, device="cuda").to(dtype).transpose(1, 2)
            k_cache = torch.randn(1, 1, n_kv, capacity, head_dim, generator=gen, device="cuda").to(dtype)
            v_cache = torch.randn_like(k_cache)
            cos, sin = _tables(steps, head_dim, context, dtype)
            cache_len = torch.tensor([context], dtype=torch.int64, device="cuda")
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen, device="cuda")) for i in range(1, steps)]
            mask = ancestor_mask(torch.tensor([parents], dtype=torch.int32, device="cuda")).contiguous()
            q_rotated = rotate_reference(q.float(), cos.float(), sin.float()).to(dtype)
            out_in, out_given = torch.empty_like(q), torch.empty_like(q)
            scale = head_dim**-0.5

            def rotated_in():
                tree_attention_triton(q, k_cache, v_cache, 0, cache_len, mask, scale, out=out_in,
                                      rope_cos=cos, rope_sin=sin)

            def given():
                tree_attention_triton(q_rotated, k_cache, v_cache, 0, cache_len, mask, scale, out=out_given)

            rotated_in()
            given()
            torch.cuda.synchronize()
            error = ((out_in.float() - out_given.float()).norm() / out_given.float().norm()).item()
            if error > 0.01:
                raise SystemExit(f"{name} {steps} queries: q rotated in the kernel and given rotated disagree "
                                 f"(relative error {error:.3g})")
            in_us = graph_us_per_call(rotated_in, calls=REPEATS, replays=30)
            given_us = graph_us_per_call(given, calls=REPEATS, replays=30)
            results["attention"].append({"shape": name, "queries": steps, "context": context, "rotated_in_us": in_us,
                                         "given_us": given_us, "relative_error": error})
            print(f"{name:10} {steps:7d} {context:7d} {in_us:13.2f} {given_us:9.2f} {in_us / given_us:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="kv_write_bench.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_write_bench times GPU kernels: run it on a machine with a CUDA GPU")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
               "repeats": REPEATS, "kv_write": [], "attention": []}
    print(f"{results['gpu']}, torch {torch.__version__}, bf16, {REPEATS} calls per CUDA graph")
    _kv_write_cases(results)
    _attention_cases(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
