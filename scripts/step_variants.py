"""Profile the compiled steps of several code variants side by side, in one process (GPU).

    python3 scripts/step_variants.py --out OUT/step_variants.json before after chunk1024 ...

Each variant is a set of switches (VARIANTS below) applied before its engines are compiled:
its plain step (when the variant can change it) and its step with the shipped head's batch-1
tree (`--tree`; default specc.draft.SHIPPED_HEAD_TREES[1]; runs before 2026-12-06 used
`tuned:64,6`) are built as `specc.generate` builds them (MT-Bench prompt 0, 32 tokens decoded,
cache 2,304 as in `specc bench spec`) and profiled over 30 CUDA-graph replays with
`specc bench profile`'s machinery: kernels per step, kernel time, first-to-last-kernel span, the draft/verify split.
A variant that leaves plain decode alone reuses the last plain profile. `--dump NAME` also
keeps Inductor's output code of that variant's steps (OUT/output_code_NAME.tar.xz), to read
which kernels Inductor made. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from specc.draft import SHIPPED_HEAD_TREES

TREE = SHIPPED_HEAD_TREES[1]


class _Environment:
    """A switch owner whose attributes are environment variables (the env_choice switches,
    read when a step is traced); None unsets one."""

    def __getattr__(self, name: str) -> str | None:
        return os.environ.get(name)

    def __setattr__(self, name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


ENV = _Environment()


def _switches(name: str) -> tuple[dict, bool]:
    """(the module attributes and Inductor options a variant sets, whether plain decode changes)."""
    from specc.lowering import kv_write_triton, topk_triton, tree_attention_triton
    from specc.passes import decode_step, speculative_step

    table = {
        # base and where (the first call, 68c4d21) timed parent_features, since undone; chunk* and combo ran there too
        "before": ({(speculative_step, "GROW_TOKEN_LIST"): False,
                    (speculative_step, "CONSTANT_CATCH_UP_MASK"): False}, False),
        "after": ({}, True),  # profiles plain too: it may follow a variant that changed it
        # 2026-12-06b: plain decode's mask and n_out built inside the step (a mask fill kernel
        # per layer), and the speculative step's state written by Inductor's copies instead of
        # specc::advance_state; "unfused" is the code before both
        "plainmask": ({(decode_step, "CONSTANT_PLAIN_TENSORS"): False}, True),
        "statecopies": ({(speculative_step, "ADVANCE_STATE_OP"): False}, True),  # plain as "after"
        "unfused": ({(decode_step, "CONSTANT_PLAIN_TENSORS"): False, (speculative_step, "ADVANCE_STATE_OP"): False}, True),
        "aggr": ({(torch._inductor.config, "aggressive_fusion"): True}, True),
        "chunk2048": ({(topk_triton, "CHUNK"): 2048}, True),
        "chunk1024": ({(topk_triton, "CHUNK"): 1024}, True),
        # 2026-12-06c: the top-k chunks before scripts/topk_bench.py chose them, and each
        # layer's K/V written inside its attention launch (SPECC_FUSE_KV_WRITE=1, off by default)
        "topk4096": ({(topk_triton, "CHUNK"): 4096, (topk_triton, "ARGMAX_CHUNK"): 4096}, True),
        "kvfused": ({(ENV, "SPECC_FUSE_KV_WRITE"): "1"}, True),
        # 2026-12-06d: the rotary tables in one buffer for every op (off by default)
        "sharedrope": ({(ENV, "SPECC_SHARE_ROTARY_TABLES"): "1"}, True),
        # 2026-12-06e: kv_write's launch before launch_settings (plain's one-token write is the
        # same under both)
        "kvtiles16": ({(kv_write_triton, "TILE_RULE"): "tiles16"}, False),
        # 2026-12-07: Inductor's GEMM autotuning (cuBLAS against its Triton templates, which
        # can take their neighbours' pointwise ops as prologue or epilogue), with every backend
        # or the templates alone; and tree attention's prefix chunks of at least 512 keys.
        # autotune's plain step was still compiling after ~110 s, 8 GEMM shapes tuned
        # (results/2026-12-07b_h100): give it a call of its own, `after` beside it
        "autotune": ({(torch._inductor.config, "max_autotune_gemm"): True}, True),
        "autotune_triton": ({(torch._inductor.config, "max_autotune_gemm"): True,
                             (torch._inductor.config, "max_autotune_gemm_backends"): "TRITON"}, True),
        "minchunk512": ({(tree_attention_triton, "_MIN_CHUNK"): 512}, True),
        # and the top-k's int64 keys for 16-bit logits (before topk_triton.NARROW_KEYS)
        "widekeys": ({(topk_triton, "NARROW_KEYS"): False}, True),
        "combo": ({(torch._inductor.config, "combo_kernels"): True}, True),
        "cdt": ({(torch._inductor.config, "coordinate_descent_tuning"): True}, True),
    }
    if name not in table:
        raise SystemExit(f"variant {name!r}: use one of {sorted(table)}")
    return table[name]


def _output_code_files(since: float) -> list[Path]:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    files = [p for p in Path(cache_dir()).rglob("*.py") if p.stat().st_mtime >= since]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dump", action="append", default=[], help="variant whose output code to keep")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tree", default=TREE, help=f"the speculative step's tree (default {TREE})")
    args = parser.parse_args()
    tree_name = args.tree

    import specc
    from specc.bench.acceptance_gap import load_model_and_head
    from specc.bench.end_to_end import load_prompts
    from specc.bench.step_profile import profile_engine
    from specc.generate import tree_plan

    if not torch.cuda.is_available():
        raise SystemExit("scripts/step_variants.py profiles CUDA-graph steps: run it on a GPU")
    for name in args.variants:
        _switches(name)  # every name checked before the first compile
    model, tokenizer, draft, dtype = load_model_and_head(argparse.Namespace(model=None, draft=None, device=None), None)
    prompt = load_prompts(tokenizer)[1][0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, plain = [], None
    for name in args.variants:
        switches, changes_plain = _switches(name)
        saved = {key: getattr(*key) for key in switches}
        for (owner, attr), value in switches.items():
            setattr(owner, attr, value)
        started = time.time()
        try:
            rows = {}
            for tree in (["plain"] if changes_plain or plain is None else []) + [tree_name]:
                torch._dynamo.reset()
                backend = specc.backend() if tree == "plain" else specc.backend(draft=draft, tree=tree)
                compiled = torch.compile(model, backend=backend)
                specc.generate(compiled, [prompt], max_new_tokens=32, max_seq_len=2304)
                (engine,) = compiled.__dict__["_specc_engines"].values()
                profile = profile_engine(engine, args.steps, model.config.num_hidden_layers)
                rows[tree] = {k: profile[k] for k in ("kernels_per_step", "us_per_step", "span_us", "phases",
                                                      "by_kind", "kernels", "timeline")}
                del compiled, engine
            if "plain" in rows:
                plain = rows["plain"]
            else:
                rows["plain"] = {**plain, "reused": True}
            result = {"variant": name, "seconds": time.time() - started, **rows}
            results.append(result)
            spec, base = rows[tree_name], rows["plain"]
            print(f"variant {name}: plain {base['kernels_per_step']:.0f} kernels, span {base['span_us']:.1f} us; "
                  f"{tree_name} {spec['kernels_per_step']:.0f} kernels, span {spec['span_us']:.1f} us "
                  f"(draft {spec['phases']['draft_kernels']} kernels {spec['phases']['draft_us']:.1f} us); "
                  f"spec/plain {spec['span_us'] / base['span_us']:.3f} ({time.time() - started:.0f} s)", flush=True)
            if name in args.dump:
                files = _output_code_files(started)[:4]
                subprocess.run(["tar", "-cJf", str(out.parent / f"output_code_{name}.tar.xz"),
                                *[str(f) for f in files]], check=False)
        except Exception as error:  # noqa: BLE001  (report it and measure the next variant)
            import traceback

            traceback.print_exc()
            print(f"variant {name} failed: {error}", flush=True)
        finally:
            for (owner, attr), value in saved.items():
                setattr(owner, attr, value)
        out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "dtype": str(dtype), "tree": tree_name, "results": results}, indent=1))
    print("\nvariant          plain span us   spec span us   draft us   spec/plain")
    for r in results:
        spec, base = r[tree_name], r["plain"]
        print(f"{r['variant']:16s} {base['span_us']:13.1f} {spec['span_us']:14.1f} {spec['phases']['draft_us']:10.1f} "
              f"{spec['span_us'] / base['span_us']:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
