"""The speculative decode step: draft a tree, verify it in one target forward, accept, commit.

Derived from the rewritten target program (the same graph as plain decode, now called with
T = N tree nodes and the tree's ancestor mask) and an EAGLE draft head. One call is one
graph with fixed shapes and no host sync, so Inductor compiles it whole and the runtime
captures it in one CUDA graph.

State between steps (static buffers, updated in place):
  tokens [B, 1]            the root: the last emitted token, not yet in the target cache
  cache_len [B]            tokens in the target cache (the root's position)
  pending_tokens [B, P]    draft inputs not yet in the draft cache: token_{p+1} ...
  pending_feats [B, P, H]  ... with the target's feature_p, p = cache_len - count ... cache_len - 1
  pending_count [B]        how many of the P are real (1 + tokens accepted last step)
The draft cache always holds positions < cache_len - pending_count; its entries are written
from the target's true features ("catch-up"), never from the draft's guesses, so the draft's
cache needs no commit of its own: the accepted path is re-read with true features instead.

Step, for a static tree of N nodes and depth D (parents list, node 0 the root):
  1. catch-up: the draft reads the P pending inputs; its output at the last real one is its
     guess of the root's feature, whose logits give the root's children.
  2. draft: level by level, each node's token is the k-th best of its parent's draft logits
     (k its rank among siblings); D - 1 draft forwards, the d-th over the nodes down to
     level d, with the ancestor mask, each node at position cache_len + depth - 1.
  3. verify: the target program over the N nodes (positions cache_len + depth, tree mask).
  4. accept (specc::verify_greedy) and commit (specc::commit_kv) the accepted path's K/V.

Sampling (temperature > 0; lossless: the emitted stream is distributed as sampling the shaped
target one token at a time). The target's logits at every node are shaped with the request's
temperature / top-k / top-p (sampling.shape_logits) and specc::verify_sampling accepts:
  static trees   a node's children are successive draws without replacement from its shaped
                 draft distribution q (sampling.gumbel_top_k; rank r = draw r + 1); the number
                 of children is fixed by the tree shape, so the recursive rejection rule "rrs"
                 (which reads every parent's q) is exact and accepts the most.
  dynamic trees  EAGLE-2's reranking keeps a candidate because of its own draft probability,
                 which biases "rrs" (see verify_sampling.py); the tree is drafted as in greedy
                 (deterministic top-k) and verified with "q_one", exact for any tree chosen
                 without the verifier's random numbers.
The draft proposes from its draft vocabulary when it has one (specc/draft/vocab.py: K of the V
tokens; q is then zero outside it, which the verifier's residuals handle like any other q).
Top-k picks (the draft's children, EAGLE-2's frontier) use specc::topk: torch.topk's values,
with ties broken toward the lower index on every device (torch.topk leaves the order open), and
two kernel launches on the GPU where torch.topk's radix select over a vocabulary row takes 6-10.
Random numbers are keyed by (seed[b], counter = cache_len[b]): unique per request and step, and
independent of the batch position; the draft's Gumbel noise (row id = the parent node) and the
verifier's coins use different streams.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.sampling import gumbel_top_k
from specc.lowering.tree import ancestor_mask, sibling_rank, tree_depth, validate_parents
from specc.passes.decode_step import Sampling, greedy_tokens
from specc.passes.pipeline import TargetProgram, causal_mask


@dataclass(frozen=True)
class TreePlan:
    """Host-side facts of a static tree that the step bakes in as constants."""

    parents: tuple[int, ...]
    depth: tuple[int, ...]
    levels: tuple[tuple[int, ...], ...]  # levels[d]: the nodes at depth d, in index order
    rank: tuple[int, ...]  # each node's index among its siblings

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> TreePlan:
        parents = [int(p) for p in parents]
        validate_parents(parents)
        depth = tree_depth(torch.tensor(parents)).tolist()
        levels = tuple(tuple(i for i in range(len(parents)) if depth[i] == d) for d in range(max(depth) + 1))
        return cls(tuple(parents), tuple(depth), levels, tuple(sibling_rank(parents)))

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return len(self.levels) - 1

    def ancestor_mask(self) -> torch.Tensor:
        return ancestor_mask(torch.tensor(self.parents))

    @property
    def slots(self) -> int:
        """Cache positions past cache_len that one step writes."""
        return self.size

    @property
    def level_ordered(self) -> bool:
        """Nodes are numbered level by level (depth never decreases with the index), so the
        nodes down to any level are an index prefix."""
        return all(a <= b for a, b in zip(self.depth, self.depth[1:]))

    def children_needed(self, level: int) -> int:
        """How many top tokens of each level-`level` node's logits the tree uses."""
        nodes = set(self.levels[level])
        counts = [sum(1 for p in self.parents if p == node) for node in nodes]
        return max(counts, default=0)


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's context-dependent tree (arXiv:2406.16858): expand the top_k best nodes of each
    level by cumulative draft log-probability for `depth` levels, then keep the best
    `size - 1` of all candidates (specc::select_tree). Built on the device every step."""

    top_k: int = 8
    depth: int = 6
    size: int = 48

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.depth < 1 or self.size < 2:
            raise ValueError(f"dynamic tree needs top_k >= 1, depth >= 1, size >= 2; got {self}")
        if self.size - 1 > self.candidates:
            raise ValueError(
                f"a dynamic tree of size {self.size} needs {self.size - 1} candidates but top_k={self.top_k}, "
                f"depth={self.depth} draft only {self.candidates}; lower size or raise top_k/depth"
            )

    @property
    def candidates(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k**2

    @property
    def max_depth(self) -> int:
        # a tree of `size` nodes is at most size - 1 deep, however deep the drafting went
        return min(self.depth, self.size - 1)

    @property
    def slots(self) -> int:
        """Cache positions past cache_len that one step writes (target tree, draft frontiers)."""
        return max(self.size, (self.depth - 1) * self.top_k)


def draft_features(draft, final_hidden: torch.Tensor, layer_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The target hidden states the draft reads, fused to [B, T, H]."""
    if draft.config.kind == "eagle3":
        return draft.fuse_features([layer_outputs[i] for i in draft.config.feature_layers])
    return final_hidden


def path_features(draft, final_hidden: torch.Tensor, layer_outputs: Sequence[torch.Tensor],
                  path: torch.Tensor) -> torch.Tensor:
    """draft_features of the tree nodes on `path` [B, P] only, [B, P, H]: the rows are gathered
    first, so EAGLE-3's feature fusion (a GEMM) runs on P rows instead of the tree's N."""
    rows = torch.arange(path.shape[0], device=path.device)[:, None]
    return draft_features(draft, final_hidden[rows, path], [layer[rows, path] for layer in layer_outputs])


def decoder(draft, stacked=None) -> Callable:
    """The draft's decode, with its stacked projections when given (drafts without them, such
    as the tests' oracle, take the plain signature)."""
    return draft.decode if stacked is None else functools.partial(draft.decode, stacked=stacked)


def make_spec_prefill(program: TargetProgram, draft, stacked=None) -> Callable:
    """Prefill the target, then the draft on positions 0 .. len - 2 (their features are final);
    the last prompt position becomes the one pending draft input. `stacked`: the draft's
    StackedProjections (one GEMM for q/k/v, one for gate/up), or None."""
    draft_decode = decoder(draft, stacked)

    def spec_prefill(input_ids, prompt_lens, cache_len, k_cache, v_cache, draft_k, draft_v,
                     pending_tokens, pending_feats, pending_count):
        batch, steps = input_ids.shape
        device = input_ids.device
        positions = cache_len[:, None] + torch.arange(steps, device=device)[None, :]
        logits, hidden, *layers = program(input_ids, positions, cache_len, causal_mask(batch, steps, device), k_cache, v_cache)
        features = draft_features(draft, hidden, layers)
        if steps > 1:
            draft_decode(input_ids[:, 1:], features[:, :-1], positions[:, :-1], cache_len,
                         causal_mask(batch, steps - 1, device), draft_k, draft_v)
        rows = torch.arange(batch, device=device)
        last = prompt_lens - 1
        pending_feats[:, 0] = features[rows, last].to(pending_feats.dtype)
        pending_count.fill_(1)
        return logits[rows, last], features[rows, last]

    return spec_prefill


@dataclass
class StaticTreeConstants:
    """The static tree as device tensors, made once outside the traced step: a tensor built
    from a Python list inside the step would be a host constant copied in on every replay,
    which a CUDA graph cannot capture."""

    parents: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    level_nodes: list[torch.Tensor]  # per level: node indices
    level_rows: list[torch.Tensor]  # per level: node index - 1 (rows of the non-root hidden)
    parent_slot: list[torch.Tensor]  # per level: the parent's position in the previous level
    child_rank: list[torch.Tensor]
    node_order: torch.Tensor  # per node: its place in the nodes listed level by level

    @classmethod
    def build(cls, plan: TreePlan, device) -> StaticTreeConstants:
        def t(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        levels = plan.levels
        return cls(
            parents=t(plan.parents),
            depth=t(plan.depth),
            mask=plan.ancestor_mask().to(device),
            level_nodes=[t(nodes) for nodes in levels],
            level_rows=[t([i - 1 for i in nodes]) for nodes in levels],
            parent_slot=[t([levels[d - 1].index(plan.parents[i]) for i in levels[d]]) if d else t([]) for d in range(len(levels))],
            child_rank=[t([plan.rank[i] for i in nodes]) for nodes in levels],
            node_order=t(_level_order(levels)),
        )


def _level_order(levels: Sequence[Sequence[int]]) -> list[int]:
    """Each node's index in the nodes listed level by level (levels[0] first)."""
    listed = [node for nodes in levels for node in nodes]
    order = [0] * len(listed)
    for place, node in enumerate(listed):
        order[node] = place
    return order


# Off only in scripts/step_variants.py's variants that time these changes side by side
# ("before": the first two; "statecopies" and "unfused": the third).
GROW_TOKEN_LIST = True
CONSTANT_CATCH_UP_MASK = True
ADVANCE_STATE_OP = True


def _draft_static(draft, plan: TreePlan, const: StaticTreeConstants, root_token, root_hidden, cache_len, draft_k, draft_v,
                  sampling: Sampling | None = None, seeds=None, *, draft_decode: Callable):
    """Each node's token is the rank-th best of its parent's draft logits; D - 1 draft forwards,
    the d-th over the non-root nodes down to level d when the nodes are numbered level by level
    (TreePlan.level_ordered, as every tree specc builds is), else over all of them.

    With `sampling` (temperature > 0) a node's children are instead its parent's shaped draft
    distribution q's Gumbel-top-k draws (rank r: draw r + 1), keyed by (seeds, cache_len) and the
    parent's node index; the q of every node of a drafted level is kept for the verifier.
    Returns (tree_tokens, parents, depth, tree_mask, draft_probs [B, N, V] float32 or None)."""
    batch, device = root_token.shape[0], root_token.device
    n_nodes, depth_max = plan.size, plan.max_depth
    parents, depth, tree_mask = const.parents, const.depth, const.mask
    # Tokens and features are gathered, never scattered into a buffer: Inductor then fuses the
    # gathers into the draft forward's first kernel (a scatter would be a kernel of its own).
    # level_tokens[d] holds level d's tokens; cat(level_tokens) lists the nodes level by level.
    level_tokens = [root_token[:, None]]
    # Level-ordered trees: `listed` is the nodes drafted so far, grown by one level per forward
    # from the previous forward's list. Concatenating every level afresh made each forward's
    # first kernel redo all levels' chains of dependent loads (topk rank -> parent slot ->
    # draft-vocabulary id), a kernel that grew from 2.5 to 5.3 µs with the level on the H200.
    listed = level_tokens[0]

    def tokens_down_to(level: int) -> torch.Tensor:
        # level-ordered trees: the nodes down to `level`; others: every node in node order,
        # those below `level` (not yet drafted) 0
        if plan.level_ordered:
            return listed if GROW_TOKEN_LIST else torch.cat(level_tokens, 1)
        unknown = [torch.zeros(batch, len(nodes), dtype=torch.int64, device=device) for nodes in plan.levels[level + 1:]]
        return torch.cat(level_tokens + unknown, 1)[:, const.node_order]

    level_logits = draft.proposal_logits(root_hidden[:, None])  # [B, 1, K] (K = V without a draft vocabulary)
    hidden = None
    # Node i runs at position cache_len + depth[i] - 1 in every forward that includes it, and
    # the d-th forward runs nodes 1 .. n - 1: positions and one rotary table for all non-root
    # nodes, sliced per forward, instead of a table kernel per forward (EagleDraft; the tests'
    # oracle draft computes its own).
    node_positions = cache_len[:, None] + depth[None, 1:] - 1
    node_rope = None
    if hasattr(draft, "rotary") and depth_max > 1:
        node_rope = draft.rotary(node_positions, root_hidden.dtype)
    draft_probs = None
    if sampling is not None:
        draft_probs = torch.zeros(batch, n_nodes, draft.config.vocab_size, dtype=torch.float32, device=device)
    for level in range(1, depth_max + 1):
        if sampling is None:
            top = torch.ops.specc.topk(level_logits, plan.children_needed(level - 1))[1]  # [B, |previous|, k]
        else:
            parents_here = const.level_nodes[level - 1]
            q = torch.ops.specc.shape_probs(level_logits, sampling.temperature, sampling.top_k, sampling.top_p)
            draft_probs[:, parents_here] = draft.full_vocab_probs(q)
            # draws past q's support get a token of q = 0, which the verifier never accepts
            top = gumbel_top_k(q.log(), plan.children_needed(level - 1), seeds, cache_len, parents_here[None])[0]
        top = draft.proposal_tokens(top)
        level_tokens.append(top[:, const.parent_slot[level], const.child_rank[level]])
        if plan.level_ordered:  # other trees list their nodes in tokens_down_to's node order
            listed = torch.cat([listed, level_tokens[-1]], 1)
        if level == depth_max:
            break
        # The draft forward runs the non-root nodes 1 .. n - 1: each reads its parent's guessed
        # feature (the root's, or the previous forward's output, final for every node above
        # this level). With the nodes numbered level by level, n is the count down to this
        # level; otherwise every node runs, and those below this level compute garbage now and
        # are recomputed once their parents are drafted.
        tokens = tokens_down_to(level)
        n = tokens.shape[1]
        if hidden is None:
            features = root_hidden[:, None].expand(batch, n - 1, root_hidden.shape[-1])
        else:
            features = torch.cat([root_hidden[:, None], hidden], 1)[:, parents[1:n]]
        rope = {} if node_rope is None else {"rope": (node_rope[0][:, :n - 1], node_rope[1][:, :n - 1])}
        hidden = draft_decode(tokens[:, 1:], features, node_positions[:, :n - 1], cache_len,
                              tree_mask[1:n, 1:n].expand(batch, n - 1, n - 1), draft_k, draft_v, **rope)
        if plan.level_ordered:
            # the level's nodes are consecutive: a view, where a gather would be a kernel
            nodes = plan.levels[level]
            level_logits = draft.proposal_logits(hidden[:, nodes[0] - 1:nodes[-1]])
        else:
            level_logits = draft.proposal_logits(hidden[:, const.level_rows[level]])
    return (tokens_down_to(depth_max), parents.expand(batch, n_nodes), depth.expand(batch, n_nodes),
            tree_mask.expand(batch, n_nodes, n_nodes), draft_probs)


def extend_slot_mask(slot_mask: torch.Tensor, base: int, parent_slot: torch.Tensor) -> None:
    """Write the ancestor-mask rows of slots base .. base + k - 1 (in place): each row is its
    parent slot's row (parent_slot [B, k], -1: a child of the root, no row) plus the slot itself.
    Rows before `base` must already hold their slots' ancestors."""
    k, n_slots = parent_slot.shape[1], slot_mask.shape[2]
    parent_rows = slot_mask.gather(1, parent_slot.clamp_min(0)[:, :, None].expand(-1, -1, n_slots))
    index = torch.arange(n_slots, device=slot_mask.device)
    itself = index[None, :] == (base + index[:k])[:, None]  # [k, slots]
    slot_mask[:, base:base + k] = (parent_rows & (parent_slot >= 0)[:, :, None]) | itself


def _draft_dynamic(draft, spec: DynamicTree, cand_depth_t: torch.Tensor, root_token, root_hidden, cache_len, draft_k, draft_v,
                   sampling: Sampling | None = None, seeds=None, *, draft_decode: Callable):
    """EAGLE-2: per level, the top_k frontier nodes (by cumulative log q) are run through the
    draft and each proposes its top_k children; select_tree keeps the best size - 1.
    Deterministic whatever `sampling` is (its trees are verified with the "q_one" rule, which
    reads no draft probabilities): returns (tree_tokens, parents, depth, tree_mask, None)."""
    batch, device = root_token.shape[0], root_token.device
    k, levels, hidden_size = spec.top_k, spec.depth, root_hidden.shape[-1]
    log_q = torch.log_softmax(draft.proposal_logits(root_hidden[:, None]).float(), dim=-1)[:, 0]
    frontier_scores, frontier_tokens = torch.ops.specc.topk(log_q, k)
    frontier_tokens = draft.proposal_tokens(frontier_tokens)
    cand_tokens, cand_scores = [frontier_tokens], [frontier_scores]
    cand_parents = [torch.full((batch, k), -1, dtype=torch.int64, device=device)]
    frontier_cand = torch.arange(k, device=device).expand(batch, k)
    frontier_parent_slot = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    frontier_feats = root_hidden[:, None].expand(batch, k, hidden_size)
    n_slots = (levels - 1) * k
    slot_tokens = torch.zeros(batch, max(n_slots, 1), dtype=torch.int64, device=device)
    slot_feats = torch.zeros(batch, max(n_slots, 1), hidden_size, dtype=root_hidden.dtype, device=device)
    # slot_mask[b, i, j]: slot j is slot i or its ancestor. A frontier slot's row is its parent
    # slot's row plus itself, written once per level (re-deriving the whole mask from parent
    # pointers every level took log2(slots) dependent kernels).
    slot_mask = torch.zeros(batch, max(n_slots, 1), max(n_slots, 1), dtype=torch.bool, device=device)
    slot_depth = torch.arange(max(n_slots, 1), device=device) // k + 1
    n_cand = k
    for level in range(1, levels):
        base = (level - 1) * k
        slot_tokens[:, base:base + k] = frontier_tokens
        slot_feats[:, base:base + k] = frontier_feats
        extend_slot_mask(slot_mask, base, frontier_parent_slot)
        used = level * k
        hidden = draft_decode(slot_tokens[:, :used], slot_feats[:, :used],
                              cache_len[:, None] + slot_depth[None, :used] - 1, cache_len,
                              slot_mask[:, :used, :used], draft_k, draft_v)
        frontier_hidden = hidden[:, base:base + k]
        child_log_q, child_tokens = torch.ops.specc.topk(
            torch.log_softmax(draft.proposal_logits(frontier_hidden).float(), dim=-1), k)
        child_tokens = draft.proposal_tokens(child_tokens)
        scores = (frontier_scores[:, :, None] + child_log_q).flatten(1)  # [B, k * k]
        child_tokens = child_tokens.flatten(1)
        cand_tokens.append(child_tokens)
        cand_scores.append(scores)
        cand_parents.append(frontier_cand[:, :, None].expand(batch, k, k).flatten(1))
        best_scores, best = torch.ops.specc.topk(scores, k)
        frontier_tokens, frontier_scores = child_tokens.gather(1, best), best_scores
        frontier_cand = n_cand + best
        frontier_parent_slot = base + best // k
        frontier_feats = frontier_hidden.gather(1, (best // k)[..., None].expand(batch, k, hidden_size))
        n_cand += k * k
    tree_tokens, parents, _ = torch.ops.specc.select_tree(
        root_token, torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1), torch.cat(cand_parents, 1),
        cand_depth_t, spec.size)
    return tree_tokens, parents, tree_depth(parents), ancestor_mask(parents), None


def dynamic_candidate_depth(spec: DynamicTree, device) -> torch.Tensor:
    """Depth of every candidate _draft_dynamic proposes: top_k at depth 1, top_k^2 per level after."""
    depths = [1] * spec.top_k + [d for d in range(2, spec.depth + 1) for _ in range(spec.top_k**2)]
    return torch.tensor(depths, dtype=torch.int64, device=device)


VERIFY_RULES = ("rrs", "q_one")


def sampling_rule(plan: TreePlan | DynamicTree, requested: str | None = None) -> str:
    """specc::verify_sampling's rule for a tree kind: "rrs" where children are Gumbel-top-k draws
    from q (static trees), "q_one" where they are chosen deterministically (EAGLE-2 reranking,
    for which "rrs" is biased). `requested` "q_one" is exact on any tree (it reads no draft
    probabilities), so a static tree may ask for it, to compare the two rules on one tree."""
    default = "q_one" if isinstance(plan, DynamicTree) else "rrs"
    if requested is None or requested == default:
        return default
    if requested == "rrs":
        raise ValueError("verify_rule='rrs' needs a static tree (children drawn from q without replacement); "
                         "a dynamic tree keeps candidates by their draft probability, which biases it: use "
                         "verify_rule=None or 'q_one'")
    if requested not in VERIFY_RULES:
        raise ValueError(f"verify_rule={requested!r}; pick one of {VERIFY_RULES} or None")
    return requested


def make_spec_step(program: TargetProgram, draft, plan: TreePlan | DynamicTree, sampling: Sampling | None = None,
                   verify_rule: str | None = None, stacked=None) -> Callable:
    """The speculative step; greedy (argmax drafting, specc::verify_greedy) unless `sampling`
    has temperature > 0, then lossless sampling (module docstring) with `verify_rule` (None:
    the tree's default, see sampling_rule). `stacked`: the draft's StackedProjections or None."""
    pending_slots = plan.max_depth + 1
    widest = plan.top_k if isinstance(plan, DynamicTree) else max(plan.children_needed(d) for d in range(plan.max_depth + 1))
    proposable = getattr(draft, "proposal_vocab_size", None)
    if proposable is not None and proposable < widest:
        raise ValueError(f"the draft proposes from {proposable} tokens but the tree gives a node {widest} children; "
                         f"use a larger draft vocabulary or a narrower tree")
    draft_decode = decoder(draft, stacked)
    sampling = None if sampling is None or sampling.greedy else sampling
    rule = sampling_rule(plan, verify_rule)
    # made once, as StaticTreeConstants are: built inside the step, Inductor filled it every step
    catch_up_mask = causal_mask(1, pending_slots, program.device)
    state_op = ADVANCE_STATE_OP
    if isinstance(plan, DynamicTree):
        constants = dynamic_candidate_depth(plan, program.device)
        draft_tree = _draft_dynamic
    else:
        constants = StaticTreeConstants.build(plan, program.device)
        draft_tree = _draft_static

    def spec_step(tokens, cache_len, k_cache, v_cache, seeds, draft_k, draft_v,
                  pending_tokens, pending_feats, pending_count):
        batch = tokens.shape[0]
        device = tokens.device
        rows = torch.arange(batch, device=device)

        # 1. catch-up: the draft reads its pending inputs with the target's true features
        draft_len = cache_len - pending_count
        slots = torch.arange(pending_slots, device=device)
        hidden = draft_decode(pending_tokens, pending_feats, draft_len[:, None] + slots[None, :], draft_len,
                              catch_up_mask.expand(batch, pending_slots, pending_slots) if CONSTANT_CATCH_UP_MASK
                              else causal_mask(batch, pending_slots, device), draft_k, draft_v)
        root_hidden = hidden[rows, pending_count - 1]

        # 2. draft the tree
        tree_tokens, parents, depth, tree_mask, draft_probs = draft_tree(
            draft, plan, constants, tokens[:, 0], root_hidden, cache_len, draft_k, draft_v, sampling, seeds,
            draft_decode=draft_decode)

        # 3. verify the whole tree in one target forward
        logits, final_hidden, *layers = program(tree_tokens, cache_len[:, None] + depth, cache_len,
                                                tree_mask, k_cache, v_cache)
        if sampling is None:
            accept_len, path, out_tokens = torch.ops.specc.verify_greedy(
                tree_tokens, parents, greedy_tokens(logits), plan.max_depth)
        else:
            target_probs = torch.ops.specc.shape_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            # "q_one" reads no draft probabilities: any [B, N, V] tensor fills the slot
            accept_len, path, out_tokens = torch.ops.specc.verify_sampling(
                tree_tokens, parents, target_probs, target_probs if draft_probs is None else draft_probs,
                seeds, cache_len, plan.max_depth, rule)

        # 4. commit: the accepted path's K/V moves to cache_len + j, the root included; then the
        # next step's state in one launch (specc::advance_state; it moves cache_len, so it runs
        # after commit_kv has read it). pending_count = accept_len + 1 is also the step's n_out.
        torch.ops.specc.commit_kv(k_cache, v_cache, cache_len, path, accept_len)
        features = path_features(draft, final_hidden, layers, path)
        if not state_op:
            pending_feats.copy_(features.to(pending_feats.dtype))
            pending_tokens.copy_(out_tokens.clamp_min(0))
            pending_count.copy_(accept_len + 1)
            tokens.copy_(out_tokens[rows, accept_len][:, None])
            cache_len.add_(accept_len + 1)
            return out_tokens, accept_len + 1
        torch.ops.specc.advance_state(tokens, cache_len, out_tokens, accept_len,
                                      pending_tokens, pending_count, pending_feats, features)
        return out_tokens, pending_count

    return spec_step
