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
     (k its rank among siblings); D - 1 draft forwards over the tree's nodes with the
     ancestor mask, each at position cache_len + depth - 1.
  3. verify: the target program over the N nodes (positions cache_len + depth, tree mask).
  4. accept (specc::verify_greedy) and commit (specc::commit_kv) the accepted path's K/V.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.tree import sibling_rank, validate_parents
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
        depth = [0] * len(parents)
        for node in range(1, len(parents)):
            depth[node] = depth[parents[node]] + 1
        levels = tuple(tuple(i for i in range(len(parents)) if depth[i] == d) for d in range(max(depth) + 1))
        return cls(tuple(parents), tuple(depth), levels, tuple(sibling_rank(parents)))

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return len(self.levels) - 1

    def ancestor_mask(self) -> torch.Tensor:
        n = self.size
        mask = torch.zeros(n, n, dtype=torch.bool)
        for node in range(n):
            current = node
            while current >= 0:
                mask[node, current] = True
                current = self.parents[current]
        return mask

    def children_needed(self, level: int) -> int:
        """How many top tokens of each level-`level` node's logits the tree uses."""
        nodes = set(self.levels[level])
        counts = [sum(1 for p in self.parents if p == node) for node in nodes]
        return max(counts, default=0)


def draft_features(draft, final_hidden: torch.Tensor, layer_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The target hidden states the draft reads, fused to [B, T, H]."""
    if draft.config.kind == "eagle3":
        return draft.fuse_features([layer_outputs[i] for i in draft.config.feature_layers])
    return final_hidden


def make_spec_prefill(program: TargetProgram, draft) -> Callable:
    """Prefill the target, then the draft on positions 0 .. len - 2 (their features are final);
    the last prompt position becomes the one pending draft input."""

    def spec_prefill(input_ids, prompt_lens, cache_len, k_cache, v_cache, draft_k, draft_v,
                     pending_tokens, pending_feats, pending_count):
        batch, steps = input_ids.shape
        device = input_ids.device
        positions = cache_len[:, None] + torch.arange(steps, device=device)[None, :]
        logits, hidden, *layers = program(input_ids, positions, cache_len, causal_mask(batch, steps, device), k_cache, v_cache)
        features = draft_features(draft, hidden, layers)
        if steps > 1:
            draft.decode(input_ids[:, 1:], features[:, :-1], positions[:, :-1], cache_len,
                         causal_mask(batch, steps - 1, device), draft_k, draft_v)
        rows = torch.arange(batch, device=device)
        last = prompt_lens - 1
        pending_feats[:, 0] = features[rows, last].to(pending_feats.dtype)
        pending_count.fill_(1)
        return logits[rows, last], features[rows, last]

    return spec_prefill


def make_spec_step(program: TargetProgram, draft, plan: TreePlan) -> Callable:
    n_nodes, depth_max = plan.size, plan.max_depth
    pending_slots = depth_max + 1

    def spec_step(tokens, cache_len, k_cache, v_cache, seeds, draft_k, draft_v,
                  pending_tokens, pending_feats, pending_count):
        batch = tokens.shape[0]
        device = tokens.device
        rows = torch.arange(batch, device=device)
        parents = torch.tensor(plan.parents, device=device)
        depth = torch.tensor(plan.depth, device=device)
        tree_mask = plan.ancestor_mask().to(device)

        # 1. catch-up: the draft reads its pending inputs with the target's true features
        draft_len = cache_len - pending_count
        slots = torch.arange(pending_slots, device=device)
        hidden = draft.decode(pending_tokens, pending_feats, draft_len[:, None] + slots[None, :], draft_len,
                              causal_mask(batch, pending_slots, device), draft_k, draft_v)
        root_hidden = hidden[rows, pending_count - 1]

        # 2. draft the tree level by level
        tree_tokens = torch.zeros(batch, n_nodes, dtype=torch.int64, device=device)
        tree_tokens[:, 0] = tokens[:, 0]
        node_hidden = torch.zeros(batch, n_nodes, root_hidden.shape[-1], dtype=root_hidden.dtype, device=device)
        node_hidden[:, 0] = root_hidden
        level_logits = draft.logits(root_hidden[:, None])  # [B, 1, V]
        non_root_mask = tree_mask[1:, 1:].expand(batch, n_nodes - 1, n_nodes - 1)
        for level in range(1, depth_max + 1):
            previous = plan.levels[level - 1]
            nodes = plan.levels[level]
            top = level_logits.topk(plan.children_needed(level - 1), dim=-1).indices  # [B, |previous|, k]
            parent_slot = torch.tensor([previous.index(plan.parents[i]) for i in nodes], device=device)
            child_rank = torch.tensor([plan.rank[i] for i in nodes], device=device)
            tree_tokens[:, list(nodes)] = top[:, parent_slot, child_rank]
            if level == depth_max:
                break
            # every non-root node reads its parent's guessed feature; nodes deeper than this
            # level compute garbage now and are recomputed once their parents are drafted
            hidden = draft.decode(tree_tokens[:, 1:], node_hidden[:, parents[1:]],
                                  cache_len[:, None] + depth[None, 1:] - 1, cache_len, non_root_mask, draft_k, draft_v)
            node_hidden[:, 1:] = hidden
            level_logits = draft.logits(hidden[:, [i - 1 for i in nodes]])

        # 3. verify the whole tree in one target forward
        positions = cache_len[:, None] + depth[None, :]
        logits, final_hidden, *layers = program(tree_tokens, positions, cache_len,
                                                tree_mask.expand(batch, n_nodes, n_nodes), k_cache, v_cache)
        accept_len, path, out_tokens = torch.ops.specc.verify_greedy(
            tree_tokens, parents.expand(batch, n_nodes), logits.argmax(-1), depth_max)

        # 4. commit: the accepted path's K/V moves to cache_len + j, the root included
        torch.ops.specc.commit_kv(k_cache, v_cache, cache_len, path, accept_len)
        features = draft_features(draft, final_hidden, layers)
        pending_feats.copy_(features[rows[:, None], path].to(pending_feats.dtype))
        pending_tokens.copy_(out_tokens.clamp_min(0))
        pending_count.copy_(accept_len + 1)
        tokens.copy_(out_tokens[rows, accept_len][:, None])
        cache_len.add_(accept_len + 1)
        return out_tokens, accept_len + 1

    return spec_step
