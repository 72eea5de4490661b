"""Time the pieces of the batch-1 speculative step that are the step's own (not a test).

The step's cost over a plain step is the draft (catch-up plus one draft forward per tree level)
and what verifying N tree nodes adds: tree attention over N queries, the LM head and argmax
over N rows. This times, at SmolLM2-135M's shapes, batch 1, bf16, a cache of `--capacity`:

  attention  specc::tree_attention per call for N query tokens at several contexts, with the
             default tiles and with others (BLOCK_M, num_warps) and prefix chunk counts
             (SmolLM2's heads, and Llama-3-8B's at its longer contexts);
  draft      one compiled draft forward (EAGLE-3, random weights) over T new tokens, for the
             T a draft level may run (all 63 non-root nodes of a 64-node tree, or fewer);
  argmax     the verify's argmax over N rows of the vocabulary, compiled, against
             specc::topk with k = 1.

    python3 scripts/step_parts.py --out step_parts.json

Attention figures are medians of 20 CUDA-graph replays of 50 calls; the others are medians of
CUDA-graph replays of one call (specc.bench.systems.time_ms), in µs.
"""

from __future__ import annotations

import argparse
import json

import torch

import specc.lowering  # noqa: F401  (registers the ops)
from specc.bench.common import graph_us_per_call
from specc.bench.systems import build_random_draft, build_random_model, shapes_config, time_ms
from specc.lowering.tree_attention_triton import tree_attention_triton


TILES = {"default": None, "m64w4": (64, 64, 4, 3), "m64w8": (64, 64, 8, 3), "m16n128w4": (16, 128, 4, 3),
         "m32n128w4": (32, 128, 4, 3), "m64n128w4": (64, 128, 4, 3), "m32w4": (32, 64, 4, 3), "m32w2": (32, 64, 2, 3),
         "m16w4": (16, 64, 4, 3), "m16w2": (16, 64, 2, 3)}
# prefix chunks: None is tree_attention_triton's own rule
SPLITS = {"auto": None, "4": 4, "6": 6}
SHAPES = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}


def attention_rows(shape: str, capacity: int, nodes: list[int], contexts: list[int],
                   tiles: dict = TILES, splits: dict = SPLITS) -> list[dict]:
    device = torch.device("cuda")
    n_heads, n_kv, head_dim = SHAPES[shape]
    k_cache = torch.randn(1, 1, n_kv, capacity, head_dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for steps in nodes:
        q = torch.randn(1, n_heads, steps, head_dim, device=device, dtype=torch.bfloat16)
        mask = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()[None]
        out = torch.empty_like(q)
        for context in contexts:
            if context + steps > capacity:
                continue
            cache_len = torch.tensor([context], device=device)
            row = {"shape": shape, "capacity": capacity, "nodes": steps, "context": context}
            for tile, blocks in tiles.items():
                for split, chunks in splits.items():
                    row[f"{tile}|{split}"] = graph_us_per_call(lambda b=blocks, s=chunks: tree_attention_triton(
                        q, k_cache, v_cache, 0, cache_len, mask, head_dim**-0.5, out=out, num_splits=s, blocks=b))
            rows.append(row)
            timed = {k: v for k, v in row.items() if "|" in k}
            best = min(timed, key=timed.get)
            first = next(iter(timed))
            print(f"attention {shape} N={steps:3d} context={context:5d}  {first} {timed[first]:6.2f} µs  "
                  f"best {best} {timed[best]:6.2f} µs  " + " ".join(f"{k}={v:.2f}" for k, v in timed.items()), flush=True)
    return rows


def draft_rows(capacity: int, sizes: list[int], context: int) -> list[dict]:
    from specc.draft.eagle import StackedProjections
    from specc.passes.speculative_step import decoder

    device = torch.device("cuda")
    target = build_random_model(shapes_config("smollm2-135m"), torch.bfloat16, device)
    draft = build_random_draft(target)
    draft_decode = decoder(draft, StackedProjections(draft))
    draft_k, draft_v = draft.new_cache(1, capacity, torch.bfloat16, device)
    widest = max(sizes)
    tokens = torch.randint(0, target.config.vocab_size, (1, widest), device=device)
    feats = torch.randn(1, widest, target.config.hidden_size, device=device, dtype=torch.bfloat16)
    cache_len = torch.tensor([context], device=device)
    positions = cache_len[:, None] + torch.arange(widest, device=device)[None] // 8
    mask = torch.ones(widest, widest, dtype=torch.bool, device=device).tril()[None]
    rows = []
    for size in sizes:
        def forward(t=size):
            return draft_decode(tokens[:, :t], feats[:, :t], positions[:, :t], cache_len, mask[:, :t, :t], draft_k, draft_v)

        compiled = torch.compile(forward, fullgraph=True, dynamic=False)
        stats = time_ms(compiled, device, repeats=200, warmup=5)
        rows.append({"tokens": size, "us": stats["median_ms"] * 1e3})
        print(f"draft forward T={size:3d}  {stats['median_ms'] * 1e3:6.2f} µs", flush=True)
    return rows


def argmax_rows(vocab: int, nodes: list[int]) -> list[dict]:
    device = torch.device("cuda")
    # one compiled lambda per (nodes, dtype, function): more than Dynamo's default 8 recompiles
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(nodes) + 8)
    rows = []
    for steps in nodes:
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.randn(1, steps, vocab, device=device, dtype=dtype)
            row = {"nodes": steps, "dtype": str(dtype)}
            for name, fn in {"argmax": lambda x: x.argmax(-1),
                             "topk1": lambda x: torch.ops.specc.topk(x, 1)[1][..., 0]}.items():
                compiled = torch.compile(lambda f=fn: f(logits), fullgraph=True, dynamic=False)
                row[name] = time_ms(compiled, device, repeats=200, warmup=5)["median_ms"] * 1e3
            rows.append(row)
            print(f"argmax N={steps:3d} {dtype}  inductor {row['argmax']:6.2f} µs  specc topk k=1 {row['topk1']:6.2f} µs",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=2304)
    parser.add_argument("--nodes", default="1,7,24,64")
    parser.add_argument("--contexts", default="160,320,640,1200,2000")
    parser.add_argument("--llama-capacity", type=int, default=8320)
    parser.add_argument("--llama-nodes", default="1,64")
    parser.add_argument("--llama-contexts", default="1024,8192")
    parser.add_argument("--draft-sizes", default="63,24,16,12,7")
    parser.add_argument("--parts", default="argmax,draft,attention")
    parser.add_argument("--tiles", default=",".join(TILES), help=f"attention tiles, of {','.join(TILES)}")
    parser.add_argument("--splits", default=",".join(SPLITS), help="attention prefix chunk counts: auto (the rule) or numbers")
    parser.add_argument("--out", default="step_parts.json")
    args = parser.parse_args()
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    tiles = {name: TILES[name] for name in args.tiles.split(",")}
    splits = {name: None if name == "auto" else int(name) for name in args.splits.split(",")}
    parts = args.parts.split(",")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "capacity": args.capacity}
    if "argmax" in parts:
        report["argmax"] = argmax_rows(49152, sorted({1, *ints(args.nodes)}))
    if "draft" in parts:
        report["draft"] = draft_rows(args.capacity, ints(args.draft_sizes), 320)
    if "attention" in parts:
        report["attention"] = (attention_rows("smollm2-135m", args.capacity, ints(args.nodes), ints(args.contexts),
                                              tiles, splits)
                               + attention_rows("llama3-8b", args.llama_capacity, ints(args.llama_nodes),
                                                ints(args.llama_contexts), tiles, splits))
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
