"""specc::select_tree — EAGLE-2's re-ranking: keep the best N - 1 drafted candidates as a tree.

The draft expands candidates level by level (passes/speculative_step.py); every candidate c
has a token, a cumulative draft log-probability score[c] (the sum of log q along its path)
and the index of its parent candidate (-1: a child of the root). Because log q <= 0, a
child never scores above its parent, so the best N - 1 candidates form a tree together with
the root (EAGLE-2, arXiv:2406.16858, section 4.2). Ties are broken towards shallower
candidates (a tiny depth penalty) so a child never displaces an equal-scoring parent.

Output, per sequence: the tree in specc's form, nodes in topological order (by depth, then
by score), node 0 the root:
  tree_tokens int64 [B, N]  (tree_tokens[:, 0] = root_token)
  parents     int64 [B, N]  (parents[:, 0] = -1, parents[b, i] < i)
  chosen      int64 [B, N]  the candidate behind each node (-1 for the root), so callers can
                            gather per-candidate data (e.g. the draft's distribution)
"""

from __future__ import annotations

import torch

# a score penalty per level of depth, far below any real log-probability gap that matters
DEPTH_TIE_BREAK = 1e-6


def select_tree_reference(
    root_token: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_depth: torch.Tensor,
    n_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_cand = cand_tokens.shape
    keep = n_nodes - 1
    device = cand_tokens.device
    ranked = cand_scores.float() - DEPTH_TIE_BREAK * cand_depth.float()[None, :]
    best = ranked.topk(keep, dim=-1).indices  # [B, keep]
    # topological order: by depth, then by score (a stable sort on depth after sorting by score)
    best_scores = ranked.gather(1, best)
    by_score = best_scores.argsort(dim=-1, descending=True, stable=True)
    best = best.gather(1, by_score)
    by_depth = cand_depth[best].argsort(dim=-1, stable=True)
    chosen_cands = best.gather(1, by_depth)  # [B, keep]
    # node index of every candidate (0 = not kept; parents then map through it)
    node_of = torch.zeros(batch, n_cand + 1, dtype=torch.int64, device=device)
    node_of.scatter_(1, chosen_cands + 1, torch.arange(1, keep + 1, device=device).expand(batch, keep))
    parent_cands = cand_parents.gather(1, chosen_cands)  # -1 for root children
    parents = node_of.gather(1, parent_cands + 1)  # root children -> node_of[:, 0] = 0
    tree_tokens = torch.cat([root_token[:, None], cand_tokens.gather(1, chosen_cands)], dim=1)
    parents = torch.cat([torch.full((batch, 1), -1, dtype=torch.int64, device=device), parents], dim=1)
    chosen = torch.cat([torch.full((batch, 1), -1, dtype=torch.int64, device=device), chosen_cands], dim=1)
    return tree_tokens, parents, chosen


@torch.library.custom_op("specc::select_tree", mutates_args=())
def select_tree(
    root_token: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_depth: torch.Tensor,
    n_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if n_nodes - 1 > cand_tokens.shape[1]:
        raise ValueError(f"a tree of {n_nodes} nodes needs at least {n_nodes - 1} candidates, got {cand_tokens.shape[1]}")
    # No generated kernel yet: on GPU this runs as a handful of torch kernels (topk, sorts,
    # gathers) inside the step's CUDA graph.
    return select_tree_reference(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes)


@select_tree.register_fake
def _(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes):
    batch = cand_tokens.shape[0]
    shape = (batch, n_nodes)
    new = cand_tokens.new_empty
    return new(shape, dtype=torch.int64), new(shape, dtype=torch.int64), new(shape, dtype=torch.int64)
