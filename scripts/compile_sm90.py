"""Compile the tree-attention kernel for an H100 (sm_90) on a machine without a GPU.

    python3 scripts/compile_sm90.py                      # every variant below: compiles? shared memory?
    python3 scripts/compile_sm90.py --against HEAD~1     # and PTX instruction counts against that revision's source

Triton's interpreter (the CPU tests) accepts code that its compiler refuses (a loop variable
reassigned with another shape, 2026-12-06) and says nothing of shared memory, so a kernel change
can pass every CPU test and still fail on the GPU's first call. Triton compiles for a named
target without a driver: this builds the generated kernel for sm_90 at SmolLM2's and
Llama-3-8B's shapes in each mode, and prints the shared memory each needs (Hopper has 227 KB a
block). With --against, it also compares the PTX of the variants without WRITE_KV with those of
the given git revision, by the count of each instruction (parameter loads aside, which shift
when the signature grows): equal counts say a change left those kernels' code alone. Register
counts and spills are only known once a driver loads the binary, so they are not reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections import Counter

from specc.lowering.tree_attention_triton import compile_without_gpu, kernel_source

# (head_dim, gqa_group, block_m, split_kv, rope, write_kv, dtype, num_warps, num_stages)
VARIANTS = [
    (64, 3, 16, True, True, False, "bfloat16", 4, 3),  # SmolLM2 decode and verify (split)
    (64, 3, 16, True, True, True, "bfloat16", 4, 3),
    (64, 3, 128, False, True, False, "bfloat16", 8, 3),  # SmolLM2 prefill (one pass)
    (64, 3, 128, False, True, True, "bfloat16", 8, 3),
    (128, 4, 64, True, True, False, "bfloat16", 4, 3),  # Llama-3-8B decode and verify
    (128, 4, 64, True, True, True, "bfloat16", 4, 3),  # (the launch takes 1 stage: write_kv_stages)
    (64, 3, 16, True, True, False, "float32", 4, 2),  # fp32: the correctness mode
    (64, 3, 16, True, True, True, "float32", 4, 2),
    (128, 4, 16, True, True, True, "float32", 4, 2),  # the first form needed 304,128 B here
]


def compile_variant(source_fn, variant):
    head_dim, group, block_m, split, rope, write_kv, dtype, warps, stages = variant
    extra = {"write_kv": True} if write_kv else {}
    source = source_fn(head_dim=head_dim, gqa_group=group, dtype=dtype, block_m=block_m, block_n=64,
                       split_kv=split, rope=rope, **extra)
    return compile_without_gpu(source, dtype, num_warps=warps, num_stages=stages)


def instruction_counts(ptx: str) -> Counter:
    counts = Counter()
    for line in ptx.splitlines():
        line = re.sub(r"//.*", "", line).strip()
        if line and not line.startswith((".", "$", "{", "}", ")", "(")) and "ld.param" not in line:
            counts[line.split()[0]] += 1
    return counts


def _source_at(revision: str):
    text = subprocess.run(["git", "show", f"{revision}:lowering/tree_attention_triton.py"], check=True,
                          capture_output=True, text=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(text)
    path.close()
    spec = importlib.util.spec_from_file_location("tree_attention_at_revision", path.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git revision whose kernels (without WRITE_KV) to compare with")
    args = parser.parse_args()
    old_source = _source_at(args.against) if args.against else None
    failed = 0
    for variant in VARIANTS:
        label = "D={} G={} M={} split={} rope={} write_kv={} {} warps={} stages={}".format(*variant)
        try:
            kernel = compile_variant(kernel_source, variant)
        except Exception as error:  # noqa: BLE001  (report every variant)
            failed += 1
            print(f"{label}: FAILED {type(error).__name__}: {str(error)[:400]}", flush=True)
            continue
        line = f"{label}: shared memory {kernel.metadata.shared:,} B"
        if old_source is not None and not variant[5]:
            same = instruction_counts(compile_variant(old_source, variant).asm["ptx"]) == instruction_counts(kernel.asm["ptx"])
            line += f"; PTX instruction counts {'equal to' if same else 'DIFFER from'} {args.against}'s"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
