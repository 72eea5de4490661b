"""`specc.generate`: the user's call. Tokens in, tokens and statistics out.

    compiled = torch.compile(model, backend=specc.backend())
    out = specc.generate(compiled, [prompt_ids], max_new_tokens=128)
    out.tokens, out.tokens_per_second, out.mean_accept_length

The first call traces the model (Dynamo -> specc's passes), then builds and compiles the
prefill and step programs for the batch size and cache length asked for, and captures the
step in a CUDA graph on GPU. Later calls with the same configuration reuse all of that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx.experimental._config

from specc.backend import SpeccBackend, capture
from specc.draft.eagle import EagleDraft, StackedProjections
from specc.passes.decode_step import Sampling, choose_tokens, make_plain_step, make_prefill
from specc.passes.pipeline import TargetProgram
from specc.passes.step_dump import dumping_backend, write_kernel_sources, write_tree_dump
from specc.passes.speculative_step import DynamicTree, TreePlan, make_spec_prefill, make_spec_step
from specc.runtime.buffers import DecodeBuffers
from specc.runtime.loop import DecodeLoop, GenerationOutput


class UnsupportedModelError(RuntimeError):
    """specc's passes did not recognise the model; the message says which node and why."""


@dataclass(frozen=True)
class EngineKey:
    batch: int
    max_seq_len: int
    sampling: Sampling
    compile: bool
    cuda_graph: bool
    tree: TreePlan | DynamicTree | None = None  # None: plain decode
    verify_rule: str | None = None  # sampled trees: None = the tree's exact default
    draft_vocab: int = 0  # the draft's draft-vocabulary version: a new vocabulary builds a new engine


def _unwrap(compiled: torch.nn.Module) -> torch.nn.Module:
    original = getattr(compiled, "_orig_mod", None)
    if original is None:
        raise TypeError(
            "specc.generate takes the module returned by torch.compile(model, backend=specc.backend()); "
            f"got a plain {type(compiled).__name__}"
        )
    return original


def _is_hf(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _allow_one_compile_per_engine() -> None:
    """Every engine compiles the same step code object (a new closure per engine), and every
    specc backend traces the same model forward; Dynamo counts each as a recompile of that code
    (8 by default, after which fullgraph raises and a plain forward skips the backend)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _without_duck_sizing(compiled_prefill: Callable) -> Callable:
    """The dynamic-length prefill, traced with one size symbol per dimension. Dynamo's duck
    sizing otherwise gives every dimension of equal size one symbol: a first prompt padded to 64
    tokens would tie the prompt length to the head dim (64) and the next bucket would recompile
    (seen on the GPU at `fail_on_recompile`)."""

    def prefill(*args):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled_prefill(*args)

    return prefill


def target_program(compiled: torch.nn.Module) -> tuple[TargetProgram, SpeccBackend]:
    """The rewritten target program of a compiled model (traced once, then cached on it)."""
    cached = compiled.__dict__.get("_specc_capture")
    if cached is not None:
        return cached
    model = _unwrap(compiled)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1234)
    # Batch 2 and length 7 differ, so Dynamo keeps two size symbols instead of one.
    probe = torch.randint(0, vocab, (2, 7), generator=generator).to(device)
    _allow_one_compile_per_engine()
    slot = capture(compiled, probe, {"use_cache": False} if _is_hf(model) else {})
    if slot.program is None:
        reason = slot.error or "the backend was not called; compile the model with backend=specc.backend()"
        raise UnsupportedModelError(f"specc cannot drive this model's decode: {reason}")
    compiled.__dict__["_specc_capture"] = (slot.program, slot.backend)
    return slot.program, slot.backend


def cache_positions_needed(prompt_len: int, max_new_tokens: int, plan: TreePlan | DynamicTree | None) -> int:
    """Cache positions a request may touch: a speculative step can advance depth + 1 positions
    (even past max_new_tokens, before the host sees the stop) and writes its whole tree."""
    if plan is None:
        return prompt_len + max_new_tokens
    return prompt_len + max_new_tokens * (plan.max_depth + 1) + plan.slots + plan.max_depth + 1


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_new_tokens: int, max_seq_len: int,
                     plan: TreePlan | DynamicTree | None = None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
    if not prompts:
        raise ValueError("no prompts given; pass a list of token-id lists")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; give at least one token (e.g. the BOS or chat template)")
        for position, token in enumerate(prompt):
            if not 0 <= int(token) < vocab_size:
                raise ValueError(
                    f"prompt {index} has token id {int(token)} at position {position}, outside the vocabulary [0, {vocab_size})"
                )
        needed = cache_positions_needed(len(prompt), max_new_tokens, plan)
        if needed > max_seq_len:
            raise ValueError(
                f"prompt {index} has {len(prompt)} tokens and max_new_tokens={max_new_tokens} needs {needed} cache "
                f"positions, but the cache holds {max_seq_len}; pass max_seq_len={needed} or shorten the prompt"
            )


def _as_prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    return [list(map(int, p)) for p in prompts]


class Engine:
    """Compiled prefill + step for one batch size, cache length, sampling rule and tree."""

    def __init__(self, program: TargetProgram, key: EngineKey, draft=None) -> None:
        self.key = key
        self.program = program
        self.stacked = None  # the draft's StackedProjections (speculative engines)
        k_cache, v_cache = program.new_cache(key.batch, key.max_seq_len)
        extra = ()
        if key.tree is None:
            prefill, step = make_prefill(program), make_plain_step(program, key.sampling)
        else:
            self.stacked = StackedProjections(draft) if isinstance(draft, EagleDraft) else None
            prefill = make_spec_prefill(program, draft, self.stacked)
            step = make_spec_step(program, draft, key.tree, key.sampling, key.verify_rule, self.stacked)
            draft_k, draft_v = draft.new_cache(key.batch, key.max_seq_len, program.dtype, program.device)
            slots = key.tree.max_depth + 1
            extra = (
                draft_k,
                draft_v,
                torch.zeros(key.batch, slots, dtype=torch.int64, device=program.device),
                torch.zeros(key.batch, slots, program.hidden_size, dtype=program.dtype, device=program.device),
                torch.ones(key.batch, dtype=torch.int64, device=program.device),
            )
        dump = program.dump_dir
        step_name = "06_plain_step" if key.tree is None else "06_speculative_step"
        if dump is not None and key.tree is not None:
            write_tree_dump(dump, step_name, key.tree)
        if key.compile:
            _allow_one_compile_per_engine()
            prefill_backend = dumping_backend(dump, "07_prefill") if dump else "inductor"
            step_backend = dumping_backend(dump, step_name) if dump else "inductor"
            prefill = _without_duck_sizing(torch.compile(prefill, fullgraph=True, dynamic=True, backend=prefill_backend))
            step = torch.compile(step, fullgraph=True, dynamic=False, backend=step_backend)
        self.buffers = DecodeBuffers(k_cache, v_cache, program.vocab_size, extra)
        if key.tree is not None:
            # The CUDA graph's warm-up steps run before any prompt is loaded. From the zero state
            # (cache_len 0, pending_count 1) the catch-up would write the draft cache at position
            # -1, i.e. outside it; cache_len = slots makes it a state the step is defined on
            # (cache_len >= pending_count). load_prompts resets it.
            self.buffers.cache_len.fill_(slots)
        with torch.no_grad():
            self.loop = DecodeLoop(prefill, step, self.buffers, use_cuda_graph=key.cuda_graph)

    def choose_first(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # counter = cache_len, still 0 here: the first token draws before any step, whose counters
        # (cache_len + 1 >= prompt_len + 1) never repeat it
        first = choose_tokens(logits, self.key.sampling, self.buffers.seeds, self.buffers.cache_len)
        if self.key.tree is not None:
            self.buffers.extra[2][:, 0] = first  # the root is the draft's first pending token
        return first


def tree_plan(tree) -> TreePlan | DynamicTree:
    """A backend's `tree` option: a parents list, a static tree's name from lowering/tree.py
    ("eagle", "chain:5", "full"), "tuned:N,D" (the shipped head's measured-best static tree of N
    nodes and depth <= D, specc/assets/trees; "tuned-chat:N,D" the same from the table tuned on
    chat prompts; "tuned:N,D,TABLE" reads another tune-tree file), "dynamic[:top_k,depth,size]",
    or a TreePlan/DynamicTree."""
    from specc.lowering.tree import static_tree

    if tree is None:
        tree = "eagle"
    if isinstance(tree, (TreePlan, DynamicTree)):
        return tree
    if isinstance(tree, str):
        name, _, arg = tree.partition(":")
        if name == "dynamic":
            # "dynamic" or "dynamic:top_k,depth,size"
            values = [int(v) for v in arg.split(",")] if arg else []
            return DynamicTree(*values)
        if name == "chain":
            return TreePlan.from_parents(static_tree("chain", depth=int(arg or 5)))
        if name in ("tuned", "tuned-chat"):
            # "tuned:N,D": the shipped head's tree of N nodes and depth <= D (specc tune-tree);
            # "tuned-chat:N,D": the same head's tree tuned on chat prompts (specc/assets/trees);
            # "tuned:N,D,TABLE": the same from another `specc tune-tree --out` file
            from specc.draft.tree_tuning import CHAT_TUNED_TREES, TUNED_TREES, tuned_tree

            fields = arg.split(",", 2)
            try:
                nodes, depth = (int(v) for v in fields[:2])
            except ValueError:
                raise ValueError(f"tree {tree!r}: give the size and the depth, e.g. '{name}:48,6' "
                                 f"(or 'tuned:48,6,TABLE.json' for the trees of another tune-tree run)") from None
            if name == "tuned-chat" and len(fields) == 3:
                raise ValueError(f"tree {tree!r}: 'tuned-chat:N,D' names the shipped chat-tuned table; "
                                 f"for another table write 'tuned:N,D,TABLE.json'")
            table = fields[2] if len(fields) == 3 else CHAT_TUNED_TREES if name == "tuned-chat" else TUNED_TREES
            return TreePlan.from_parents(tuned_tree(nodes, depth, table))
        return TreePlan.from_parents(static_tree(name))
    return TreePlan.from_parents(list(tree))


PLAIN = "plain"  # the tree option "no drafting", though a draft is attached: for batch sizes where trees lose


def _is_plain(tree) -> bool:
    return isinstance(tree, str) and tree == PLAIN


def tree_for_batch(tree, batch: int):
    """The backend's `tree` option for a batch of `batch` sequences.

    A mapping {largest batch: tree} gives each batch size its own tree, as the paper does (the
    verify of B x N tokens stops being cheap as B grows): a batch takes the entry of the smallest
    key >= its size, and past every key the largest key's entry. Any other option is one tree for
    every batch size. `PLAIN` ("plain") decodes without drafting."""
    if not isinstance(tree, Mapping):
        return tree
    fitting = [limit for limit in tree if batch <= limit]
    return tree[min(fitting) if fitting else max(tree)]


def check_tree_option(tree) -> None:
    """Raise a ValueError naming the entry if a per-batch-size mapping is malformed: keys must be
    batch sizes >= 1, values trees that `tree_plan` takes or "plain"."""
    if not isinstance(tree, Mapping):
        return
    if not tree:
        raise ValueError("tree={} has no entries; give {largest batch: tree}, e.g. {1: 'eagle', 8: 'chain:4', 64: 'plain'}")
    for limit, entry in tree.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"tree mapping key {limit!r} is not a batch size; keys are the largest batch size "
                             f"(an int >= 1) that uses their tree, e.g. {{1: 'eagle', 8: 'chain:4', 64: 'plain'}}")
        if _is_plain(entry):
            continue
        if entry is None or isinstance(entry, Mapping):
            raise ValueError(f"tree mapping entry {limit}: {entry!r}; give a tree (a name such as 'eagle', "
                             f"'chain:5', 'dynamic:8,8,64', or a parents list) or 'plain'")
        try:
            tree_plan(entry)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"tree mapping entry {limit}: {entry!r} is not a tree ({error})") from error


def _default_max_seq_len(prompts: list[list[int]], max_new_tokens: int, plan: TreePlan | DynamicTree | None) -> int:
    # round up so that nearby requests share one compiled configuration
    needed = cache_positions_needed(max(len(p) for p in prompts), max_new_tokens, plan)
    return 256 * math.ceil(needed / 256)


@torch.no_grad()
def generate(
    compiled: torch.nn.Module,
    prompts,
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] = (),
    max_seq_len: int | None = None,
    compile: bool = True,
    cuda_graph: bool | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids; one list or many).

    temperature 0 is greedy; otherwise sampling with top_k / top_p, seeded per request
    (`seed` an int for all, or one per prompt). Stops a sequence at any of `stop_ids`.
    """
    program, backend = target_program(compiled)
    prompts = _as_prompt_lists(prompts)
    sampling = Sampling(temperature, top_k, top_p)
    chosen = tree_for_batch(backend.tree, len(prompts))
    plan = tree_plan(chosen) if backend.draft is not None and not _is_plain(chosen) else None
    max_seq_len = max_seq_len or _default_max_seq_len(prompts, max_new_tokens, plan)
    validate_prompts(prompts, program.vocab_size, max_new_tokens, max_seq_len, plan)
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; pass one seed or one per prompt")
    on_gpu = program.device.type == "cuda"
    key = EngineKey(
        batch=len(prompts),
        max_seq_len=max_seq_len,
        sampling=sampling,
        compile=compile,
        cuda_graph=(on_gpu and compile) if cuda_graph is None else cuda_graph,
        tree=plan,
        verify_rule=backend.verify_rule if plan is not None else None,
        draft_vocab=getattr(backend.draft, "draft_vocab_version", 0) if plan is not None else 0,
    )
    if key.cuda_graph and not on_gpu:
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    engines = compiled.__dict__.setdefault("_specc_engines", {})
    if key not in engines:
        engines[key] = Engine(program, key, backend.draft)
    engine = engines[key]
    # the stacked projection weights are copies: re-read the model's and the draft's current ones
    program.refresh_stacked_weights()
    if engine.stacked is not None:
        engine.stacked.refresh()
    if plan is not None and isinstance(backend.draft, EagleDraft):
        backend.draft.refresh_vocab_head()
    output = engine.loop.run(prompts, max_new_tokens, stop_ids, seeds, engine.choose_first)
    if program.dump_dir is not None:
        write_kernel_sources(program.dump_dir)
    return output
