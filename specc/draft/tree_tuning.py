"""Static draft trees chosen from a head's measured acceptance (`specc tune-tree`).

Greedy verification accepts the longest tree path whose tokens are the target's greedy tokens.
A static tree's k-th child of a node carries the draft's k-th most likely token there
(lowering/tree.py), so the non-root node with sibling-rank path p = (r_1, ..., r_d) is accepted
iff, for every depth k <= d, the target's greedy token at depth k is the draft's rank-r_k
token, the draft having been fed the greedy tokens before it. That is one rank per depth per
step, the same for every tree, and it can be measured teacher-forced on greedy text in one
pass (the training-time-test unroll, specc.draft.train.unroll): rank_k(s) is the rank of the
target's token among the draft's step-k logits for the chain that starts at s. Then

    P(p)                = mean over starts s of  prod_k [rank_k(s) == r_k]
    E[accept length]    = 1 + sum over the tree's non-root nodes p of P(p)      (bonus included)

exactly, on that text, for every static tree at once (Sequoia and EAGLE-2 pick trees by this
quantity; here it is measured, not modelled). P never grows along a path, because a path is
accepted only when its prefix is, so the best tree of N nodes and depth <= D is found by
growing from the root, always adding the frontier node of largest P (the frontier of a node
is its first child and its next sibling, which keeps every tree one that `tree_from_paths`
accepts: prefixes present, ranks in order).

Ranks break ties as specc::topk does: by the larger logit, then the lower token id.

    specc tune-tree --prompts seed-tasks --n-prompts 64 --max-new-tokens 192 --nodes 25,32,48,64 \\
        --depths 5,6,7 --out tree_tuning.json

The prompts must not be the ones a benchmark then measures on (MT-Bench): a tree tuned on its
test prompts would report an acceptance it did not earn.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from specc.lowering.tree import sibling_rank, static_tree, tree_from_paths

Path_ = tuple[int, ...]


# ----- measuring: ranks of the target's tokens among the draft's, per depth --------------------
def token_ranks(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank of token[...] among logits[..., V] (0 = the top one), ties to the lower id."""
    chosen = logits.gather(-1, token[..., None])
    ids = torch.arange(logits.shape[-1], device=logits.device)
    ahead = (logits > chosen) | ((logits == chosen) & (ids < token[..., None]))
    return ahead.sum(-1)


def proposal_ranks(draft, hidden: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank of token[...] among the draft's proposal logits at `hidden` (its draft vocabulary
    when it has one); a token outside that vocabulary, which no tree can hold, ranks K."""
    logits = draft.proposal_logits(hidden).float()
    index = draft.proposal_index(token)
    ranks = token_ranks(logits, index.clamp_min(0))
    return torch.where(index >= 0, ranks, torch.full_like(ranks, logits.shape[-1]))


@torch.no_grad()
def ranks_by_sequence(target: torch.nn.Module, draft, sequences: Sequence[Sequence[int]], depth: int,
                      prompt_lens: Sequence[int], batch_size: int = 4, log=None) -> list[torch.Tensor]:
    """Teacher-forced ranks on greedy text (prompt + the target's greedy answer), per sequence:
    int64 [starts, depth] whose row j is the chain start s = prompt_len - 1 + j, i.e. the
    decode step whose root is token s + 1 (the first step's root is the prefill's token, at
    position prompt_len). Rows stop where s + depth + 1 would pass the text's end. Column k is
    the rank of the target's greedy token s + k + 2 among the draft's step-k logits, the draft
    having been fed the text (the greedy tokens) before it.

    Every column is meaningful, not only those after rank-0 ones: the rank-r child of a node
    that carries the greedy token is drafted from that same greedy token, so row s's path of
    sibling ranks is (ranks[s, 0], ranks[s, 1], ...) down the whole depth."""
    from specc.draft.train import step0_features, target_states, unroll

    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
    device = next(draft.parameters()).device
    lm_head = target.lm_head.weight
    out = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin:begin + batch_size]
        longest = max(map(len, chunk))
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.as_tensor(seq)
        ids = ids.to(device)
        final, layers = target_states(target, ids, draft.config.feature_layers)
        # greedy[:, t]: the target's choice of token t + 1; padded so every column can be sliced
        greedy = F.pad(F.linear(final, lm_head).argmax(-1), (0, depth + 1))
        hidden = unroll(draft, ids, step0_features(draft, final, layers)[:, :-1], depth)
        width = longest - 1
        # h^(k)[:, s] predicts token s + k + 2, the target's choice at s + k + 1
        ranks = torch.stack([proposal_ranks(draft, h, greedy[:, k + 1:k + 1 + width])
                             for k, h in enumerate(hidden)], dim=-1)  # [B, T - 1, depth]
        for row, (seq, prompt_len) in enumerate(zip(chunk, prompt_lens[begin:begin + batch_size])):
            first, last = prompt_len - 1, len(seq) - depth - 2
            out.append(ranks[row, first:max(first, last + 1)].cpu())
        if log is not None:
            log(f"  ranks: {len(out)}/{len(sequences)} sequences")
    return out


def chain_ranks(target: torch.nn.Module, draft, sequences: Sequence[Sequence[int]], depth: int,
                prompt_lens: Sequence[int], batch_size: int = 4, log=None) -> torch.Tensor:
    """ranks_by_sequence, every sequence's rows in one [starts, depth] tensor."""
    rows = ranks_by_sequence(target, draft, sequences, depth, prompt_lens, batch_size, log)
    return torch.cat(rows) if rows else torch.zeros(0, depth, dtype=torch.long)


def accepted_depth(path: Sequence[int], tree: set[Path_]) -> int:
    """How many draft tokens a step accepts whose greedy path of ranks is `path`: the depth of
    the deepest tree node on it (the tree holds every prefix of its paths)."""
    depth = 0
    while depth < len(path) and tuple(path[:depth + 1]) in tree:
        depth += 1
    return depth


def predicted_accepts(ranks: torch.Tensor, paths: Sequence[Path_], steps: int | None = None) -> list[int]:
    """The accept lengths (bonus included) a greedy decode with the static tree of `paths`
    takes, step by step, on the text `ranks` (one sequence's ranks_by_sequence) describes:
    the first step's root is row 0; a step accepting a moves the root a rows on. Stops where
    the rows do (or after `steps` steps)."""
    tree = {tuple(p) for p in paths}
    lengths, row = [], 0
    table = ranks.tolist()
    while row < len(table) and (steps is None or len(lengths) < steps):
        accept = 1 + accepted_depth(table[row], tree)
        lengths.append(accept)
        row += accept
    return lengths


def path_probabilities(ranks: torch.Tensor, max_rank: int) -> dict[Path_, float]:
    """P(p) for every path p of sibling ranks < max_rank that some start takes: the share of
    starts whose ranks begin with p."""
    starts = ranks.shape[0]
    counts: Counter[Path_] = Counter()
    for row in ranks.tolist():
        path: list[int] = []
        for rank in row:
            if rank >= max_rank:
                break
            path.append(rank)
            counts[tuple(path)] += 1
    return {p: c / starts for p, c in counts.items()} if starts else {}


# ----- choosing ------------------------------------------------------------------------------
def expected_accept_length(paths: Sequence[Path_], probability: dict[Path_, float]) -> float:
    """1 + sum of P over the tree's non-root nodes: tokens per step, bonus included."""
    return 1.0 + sum(probability.get(tuple(p), 0.0) for p in paths)


def best_tree(probability: dict[Path_, float], nodes: int, depth: int) -> list[Path_]:
    """The paths of the N-node (root included) tree of depth <= `depth` with the largest
    expected accept length, grown from the root by the frontier rule (module docstring)."""
    if nodes < 1 or depth < 0:
        raise ValueError(f"a tree needs nodes >= 1 and depth >= 0; got nodes={nodes}, depth={depth}")
    chosen: list[Path_] = []
    frontier: list[tuple[float, int, Path_]] = []
    order = 0

    def offer(path: Path_) -> None:
        nonlocal order
        if len(path) <= depth:
            heapq.heappush(frontier, (-probability.get(path, 0.0), order, path))
            order += 1

    offer((0,))
    while frontier and len(chosen) < nodes - 1:
        _, _, path = heapq.heappop(frontier)
        chosen.append(path)
        offer(path + (0,))
        offer(path[:-1] + (path[-1] + 1,))
    return sorted(chosen, key=lambda p: (len(p), p))


def tree_paths(parents: Sequence[int]) -> list[Path_]:
    """The sibling-rank paths of a parents list's non-root nodes (tree_from_paths' inverse)."""
    paths: list[Path_] = [()]
    for parent, rank in list(zip(parents, sibling_rank(parents)))[1:]:
        paths.append(paths[parent] + (rank,))
    return paths[1:]


# ----- the command ---------------------------------------------------------------------------
def tuning_prompts(tokenizer, source: str, n_prompts: int) -> list[list[int]]:
    """ChatML prompts from a source the benchmarks do not measure on: "seed-tasks" (the
    self-instruct seed tasks) or "gsm8k" (GSM8K train questions), or a JSONL file of MT-Bench form."""
    from specc.draft.data import load_gsm8k, load_seed_tasks, seed_task_text

    if source == "seed-tasks":
        texts = [seed_task_text(task) for task in load_seed_tasks()]
    elif source == "gsm8k":
        texts = [row["question"] for row in load_gsm8k()]
    else:
        from specc.bench.common import mt_bench_first_turns

        texts = [row["prompt"] for row in mt_bench_first_turns(source)]
    if not texts:
        raise ValueError(f"no prompts in {source!r}")
    # every k-th, so that a short run still spans the source's kinds of task
    stride = max(1, len(texts) // n_prompts)
    return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts[::stride][:n_prompts]]


def greedy_texts(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, stop_id: int | None,
                 log=print) -> list[list[int]]:
    """prompt + the target's greedy answer (specc's plain decode, uncompiled), cut at the stop token."""
    import specc

    compiled = torch.compile(model, backend=specc.backend())
    texts = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin:begin + batch_size]
        out = specc.generate(compiled, chunk, max_new_tokens=max_new_tokens, compile=False,
                             stop_ids=() if stop_id is None else (stop_id,))
        texts += [p + t for p, t in zip(chunk, out.tokens)]
        log(f"  greedy answers: {len(texts)}/{len(prompts)}")
    return texts


def tune(ranks: torch.Tensor, nodes: Sequence[int], depths: Sequence[int], max_rank: int = 16) -> dict:
    """Best trees per (N, D) and the expected accept length of each, with the named trees'."""
    probability = path_probabilities(ranks, max_rank)
    named = {"eagle": static_tree("eagle"), **{f"chain:{d}": static_tree("chain", depth=d) for d in range(1, 9)}}
    named_paths = {name: tree_paths(parents) for name, parents in named.items()}
    reference = {name: expected_accept_length(paths, probability) for name, paths in named_paths.items()
                 if max(map(len, paths)) <= ranks.shape[1]}
    trees = []
    for depth in depths:
        for n in nodes:
            paths = best_tree(probability, n, depth)
            trees.append({"nodes": n, "depth": depth, "levels": max(map(len, paths), default=0),
                          "expected_accept_length": expected_accept_length(paths, probability),
                          "paths": [list(p) for p in paths]})
    # the share of starts whose first k + 1 drafts are all the top-1 token (a chain's reach)
    by_depth = torch.cumprod((ranks == 0).double(), dim=1).mean(0).tolist() if ranks.shape[0] else [0.0] * ranks.shape[1]
    rank_share = [[float((ranks[:, k] == r).float().mean()) for r in range(8)] for k in range(ranks.shape[1])]
    return {"starts": int(ranks.shape[0]), "chain_reach": by_depth, "rank_share_by_depth": rank_share,
            "named_trees": reference, "trees": trees}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("tune-tree", help="static draft trees chosen from a head's measured acceptance",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Llama GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", default=None, help="the head (default: the shipped one)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="K",
                        help="rank within the head's top K tokens (0: the whole vocabulary; default: the head "
                             "file's own draft vocabulary, as decoding uses it)")
    parser.add_argument("--prompts", default="seed-tasks", help="seed-tasks, gsm8k or a JSONL file (never MT-Bench)")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nodes", default="25,32,48,64", help="tree sizes N (root included), comma-separated")
    parser.add_argument("--depths", default="5,6,7", help="largest depths D, comma-separated")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 on a CPU, bf16 on a GPU")
    parser.add_argument("--out", default="tree_tuning.json")
    parser.add_argument("--plot", default=None, metavar="PNG", help="expected accept length against tree size")
    parser.add_argument("--save-ranks", default=None, metavar="PT", help="also save the measured ranks here")
    parser.add_argument("--from-ranks", action="append", default=[], metavar="PT",
                        help="tune from saved ranks instead of measuring (repeat to pool several)")
    parser.set_defaults(func=cmd_tune_tree)
    return parser


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from specc.bench.common import environment

    nodes = [int(n) for n in args.nodes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    started = time.perf_counter()
    if args.from_ranks:
        # re-tune from saved measurements (--save-ranks), pooled: no model needed
        saved = [torch.load(path) for path in args.from_ranks]
        ranks = torch.cat([entry["ranks"].long() for entry in saved])
        measured = {"from_ranks": [{k: v for k, v in entry.items() if k != "ranks"} for entry in saved]}
        if ranks.shape[1] < max(depths):
            raise SystemExit(f"the saved ranks go {ranks.shape[1]} deep; --depths asks for {max(depths)}")
    else:
        ranks, measured = _measure(args, max(depths))
    result = tune(ranks, nodes, depths)
    report = {"command": "specc " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "environment": environment(),
              **measured, "seconds": time.perf_counter() - started, **result}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{result['starts']} chain starts; expected accept length (bonus included):")
    for name, value in result["named_trees"].items():
        print(f"  {name:10s} {value:.3f}")
    for tree in result["trees"]:
        print(f"  N={tree['nodes']:3d} D<={tree['depth']} (levels {tree['levels']}): {tree['expected_accept_length']:.3f}")
    print(f"wrote {args.out}")
    if args.plot and plot_tuning(report, args.plot):
        print(f"plot written: {args.plot}")
    return 0


def _measure(args: argparse.Namespace, depth: int) -> tuple[torch.Tensor, dict]:
    """Greedy answers to the tuning prompts, then the head's ranks on them (and --save-ranks)."""
    from specc.bench.acceptance_gap import load_model_and_head

    if "mt_bench" in str(args.prompts).lower():
        raise SystemExit("--prompts must not be MT-Bench: the benchmarks measure on it (pick seed-tasks or gsm8k)")
    model, tokenizer, draft, dtype = load_model_and_head(args, args.dtype)
    prompts = tuning_prompts(tokenizer, args.prompts, args.n_prompts)
    print(f"{len(prompts)} prompts from {args.prompts}; greedy answers of up to {args.max_new_tokens} tokens", flush=True)
    texts = greedy_texts(model, prompts, args.max_new_tokens, args.batch_size, tokenizer.eos_id,
                         log=lambda line: print(line, flush=True))
    ranks = chain_ranks(model, draft, texts, depth, [len(p) for p in prompts], log=lambda line: print(line, flush=True))
    measured = {"dtype": str(dtype), "prompts": args.prompts, "n_prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens, "proposal_vocab_size": draft.proposal_vocab_size,
                "response_tokens": sum(len(t) - len(p) for t, p in zip(texts, prompts))}
    if args.save_ranks:
        # ranks past 32767 only ever mean "not in any tree": int16 keeps the file small
        torch.save({**measured, "ranks": ranks.clamp(max=32767).to(torch.int16)}, args.save_ranks)
    return ranks, measured


def plot_tuning(report: dict, path: str | Path) -> Path | None:
    """Expected accept length against tree size, one line per largest depth, with the named
    trees ("eagle", the chains) as points: where a deeper or a wider tree pays."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for depth in sorted({t["depth"] for t in report["trees"]}):
        trees = sorted((t for t in report["trees"] if t["depth"] == depth), key=lambda t: t["nodes"])
        axes.plot([t["nodes"] for t in trees], [t["expected_accept_length"] for t in trees], marker="o",
                  label=f"best tree, depth <= {depth}")
    for name, value in report["named_trees"].items():
        nodes = len(static_tree("eagle")) if name == "eagle" else int(name.split(":")[1]) + 1
        axes.scatter([nodes], [value], marker="x", color="black")
        axes.annotate(name, (nodes, value), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("tree nodes N (root included)")
    axes.set_ylabel("expected accept length (bonus included)")
    axes.set_title(f"{report['starts']} chain starts, teacher-forced", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return Path(path)


# ----- the shipped head's tuned trees (`tree="tuned:N,D"`) --------------------------------------
TUNED_TREES = Path(__file__).resolve().parent.parent / "assets" / "trees" / "smollm2-135m-instruct-eagle3.json"
# the same head's trees tuned on chat (specc/assets/prompts/chat_dev.jsonl), up to 128 nodes
CHAT_TUNED_TREES = TUNED_TREES.with_name("smollm2-135m-instruct-eagle3-chat.json")


@functools.lru_cache(maxsize=8)
def _tuned_table(path: str) -> dict:
    # read once per file: tree_plan resolves the tree option on every generate call
    return json.loads(Path(path).read_text())


def tuned_tree(nodes: int, depth: int, path: str | Path = TUNED_TREES) -> list[int]:
    """The parents list of the N-node, depth <= D tree tuned for the shipped head
    (specc/assets/trees/README.md says on what). It suits that head; another head wants its
    own `specc tune-tree` run. `path`: the table (a `specc tune-tree --out` file)."""
    if not Path(path).is_file():
        raise ValueError(f"no tuned-tree table at {path}; give a `specc tune-tree --out` JSON file")
    report = _tuned_table(str(path))
    for tree in report["trees"]:
        if tree["nodes"] == nodes and tree["depth"] == depth:
            return tree_from_paths(tree["paths"])
    have = ", ".join(f"tuned:{t['nodes']},{t['depth']}" for t in report["trees"])
    raise ValueError(f"no tuned tree of {nodes} nodes and depth {depth} in {Path(path).name}; there are {have}")
