"""specc::select_tree — EAGLE-2's re-ranking: keep the best N - 1 drafted candidates as a tree.

The draft expands candidates level by level (passes/speculative_step.py); every candidate c
has a token, a cumulative draft log-probability score[c] (the sum of log q along its path),
a depth (1: a child of the root) and the index of its parent candidate (-1: a child of the
root). Because log q <= 0, a child never scores above its parent, so the best N - 1
candidates form a tree together with the root (EAGLE-2, arXiv:2406.16858, section 4.2).

"Best" is one total order, so that every implementation keeps and places the same candidates
whatever the ties: score descending, then depth ascending, then candidate index ascending.
Depth before index makes a child (equal score, deeper) never displace its parent; the index
settles the rest (siblings of equal score: the draft's top-k order). An earlier version ranked
by score - 1e-6 * depth with torch.topk, whose order among equal values is unspecified, and
whose float32 penalty rounds away for |score| >= 16 (a child could then displace its parent).

Inputs, for B sequences and C candidates:
  root_token    int [B]     the tree's root (the last accepted token)
  cand_tokens   int [B, C]
  cand_scores   float [B, C]
  cand_parents  int [B, C]  a candidate's parent candidate, -1 for the root; a parent's
                            score >= its child's
  cand_depth    int [C]     the same for every sequence (the draft's levels are static)
  n_nodes       int         N, 1 <= N <= C + 1
Output, per sequence: the tree in specc's form, nodes in topological order (by depth, then in
the order above), node 0 the root:
  tree_tokens int64 [B, N]  (tree_tokens[:, 0] = root_token)
  parents     int64 [B, N]  (parents[:, 0] = -1, parents[b, i] < i)
  chosen      int64 [B, N]  the candidate behind each node (-1 for the root), so callers can
                            gather per-candidate data (e.g. the draft's distribution)
A kept candidate whose parent was not kept (only possible when scores rise along a path,
which the draft never produces) hangs off the root.
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled


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
    scores = cand_scores.float()
    depth = cand_depth.long().expand(batch, n_cand)
    # The ranking: score descending, then depth ascending, then index ascending, as stable
    # sorts from index order, least significant key first.
    by_depth = depth.argsort(dim=-1, stable=True)
    ranked = by_depth.gather(1, scores.gather(1, by_depth).argsort(dim=-1, descending=True, stable=True))
    best = ranked[:, :keep]  # [B, keep]
    # Topological order: by depth, then by rank (a stable sort on depth of the ranked best).
    chosen_cands = best.gather(1, depth.gather(1, best).argsort(dim=-1, stable=True))  # [B, keep]
    # node index of every candidate (0 = not kept; parents then map through it)
    node_of = torch.zeros(batch, n_cand + 1, dtype=torch.int64, device=device)
    node_of.scatter_(1, chosen_cands + 1, torch.arange(1, keep + 1, device=device).expand(batch, keep))
    parent_cands = cand_parents.long().gather(1, chosen_cands)  # -1 for root children
    parents = node_of.gather(1, parent_cands + 1)  # root children -> node_of[:, 0] = 0
    tree_tokens = torch.cat([root_token.long()[:, None], cand_tokens.long().gather(1, chosen_cands)], dim=1)
    parents = torch.cat([torch.full((batch, 1), -1, dtype=torch.int64, device=device), parents], dim=1)
    chosen = torch.cat([torch.full((batch, 1), -1, dtype=torch.int64, device=device), chosen_cands], dim=1)
    return tree_tokens, parents, chosen


def _check(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes: int) -> None:
    if cand_tokens.dim() != 2 or cand_scores.shape != cand_tokens.shape or cand_parents.shape != cand_tokens.shape:
        raise ValueError(
            f"select_tree needs cand_tokens, cand_scores and cand_parents of one shape [B, C]; got "
            f"{tuple(cand_tokens.shape)}, {tuple(cand_scores.shape)}, {tuple(cand_parents.shape)}"
        )
    batch, n_cand = cand_tokens.shape
    if root_token.shape != (batch,) or cand_depth.shape != (n_cand,):
        raise ValueError(
            f"select_tree needs root_token [{batch}] and cand_depth [{n_cand}] (one depth per candidate, "
            f"shared by the batch); got {tuple(root_token.shape)} and {tuple(cand_depth.shape)}"
        )
    if not 1 <= n_nodes <= n_cand + 1:
        raise ValueError(f"a tree of {n_nodes} nodes needs at least {n_nodes - 1} candidates, got {n_cand}")


@torch.library.custom_op("specc::select_tree", mutates_args=())
def select_tree(
    root_token: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_depth: torch.Tensor,
    n_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes)
    if cand_tokens.is_cuda and kernel_enabled():
        from specc.lowering.select_tree_triton import select_tree_triton

        return select_tree_triton(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes)
    return select_tree_reference(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes)


@select_tree.register_fake
def _(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes):
    _check(root_token, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes)
    batch = cand_tokens.shape[0]
    shape = (batch, n_nodes)
    new = cand_tokens.new_empty
    return new(shape, dtype=torch.int64), new(shape, dtype=torch.int64), new(shape, dtype=torch.int64)
