"""specc::verify_greedy — accept the longest draft path that greedy decoding of the target agrees with.

The target has scored every tree node in one forward; target_argmax[b, c] is its greedy next
token after node c. Walk from the root: at node c, a child x with tree_tokens[b, x] ==
target_argmax[b, c] is exactly the token plain greedy decoding would emit next, so accept it and
continue from x; when no child matches, stop. Whatever is accepted, target_argmax at the last
accepted node is also the target's greedy token (the bonus, or the correction of the rejected
draft), so every step emits accept_len + 1 tokens and the output equals plain greedy decoding.
If siblings carry the same token (possible in dynamic trees) the lowest index wins.

Inputs, per sequence b of B, for a tree of N nodes:
  tree_tokens    int [B, N]     token at each node (node 0: the last accepted token)
  parents        int [B, N]     parents[b, 0] = -1, parents[b, i] < i (lowering/tree.py)
  target_argmax  int [B, N]     the target's argmax after each node
  (int32 or int64 each; outputs are int64)
  max_depth      int            the tree's depth; nodes deeper than it are never accepted
Outputs, with a = accept_len[b] in 0..max_depth:
  accept_len     int64 [B]
  path           int64 [B, max_depth + 1]   path[b, 0] = 0 (the root), path[b, 1..a] the accepted
                 nodes, the rest 0 (so that path is always a valid node index to gather with;
                 commit_kv reads only the first a + 1 entries)
  out_tokens     int64 [B, max_depth + 1]   out_tokens[b, :a] the accepted tokens,
                 out_tokens[b, a] the bonus token target_argmax[b, path[b, a]], the rest -1
"""

from __future__ import annotations

import torch

from specc.lowering.registry import kernel_enabled


def verify_greedy_reference(
    tree_tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The walk as a static loop over depth: fixed shapes, no host sync, traceable."""
    batch, n = tree_tokens.shape
    device = tree_tokens.device
    tree_tokens, parents, target_argmax = tree_tokens.long(), parents.long(), target_argmax.long()
    nodes = torch.arange(n, device=device).expand(batch, n)
    current = torch.zeros(batch, dtype=torch.long, device=device)  # last accepted node
    accept_len = torch.zeros(batch, dtype=torch.long, device=device)
    path_columns = [current]
    token_columns = []
    # A row that found no match keeps `current`, so it finds none at any later step either:
    # no "stopped" flag is needed.
    for _ in range(max_depth):
        wanted = target_argmax.gather(1, current[:, None])  # [B, 1]
        match = (parents == current[:, None]) & (tree_tokens == wanted)
        child = torch.where(match, nodes, n).amin(1)  # the lowest matching index, n if none
        found = child < n
        current = torch.where(found, child, current)
        accept_len = accept_len + found.long()
        path_columns.append(torch.where(found, child, 0))
        token_columns.append(torch.where(found, wanted[:, 0], -1))
    token_columns.append(torch.full_like(accept_len, -1))
    path = torch.stack(path_columns, 1)
    bonus = target_argmax.gather(1, current[:, None])
    out_tokens = torch.stack(token_columns, 1).scatter(1, accept_len[:, None], bonus)
    return accept_len, path, out_tokens


def _check(tree_tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor, max_depth: int) -> None:
    if tree_tokens.dim() != 2 or parents.shape != tree_tokens.shape or target_argmax.shape != tree_tokens.shape:
        raise ValueError(
            f"verify_greedy needs tree_tokens, parents and target_argmax of one shape [B, N]; got "
            f"{tuple(tree_tokens.shape)}, {tuple(parents.shape)}, {tuple(target_argmax.shape)}"
        )
    if not 0 <= max_depth < tree_tokens.shape[1]:
        raise ValueError(
            f"max_depth={max_depth} for a tree of {tree_tokens.shape[1]} nodes; pass the tree's "
            f"depth (0 <= max_depth < N)"
        )


@torch.library.custom_op("specc::verify_greedy", mutates_args=())
def verify_greedy(
    tree_tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(tree_tokens, parents, target_argmax, max_depth)
    if tree_tokens.is_cuda and kernel_enabled():
        from specc.lowering.verify_greedy_triton import verify_greedy_triton

        return verify_greedy_triton(tree_tokens, parents, target_argmax, max_depth)
    return verify_greedy_reference(tree_tokens, parents, target_argmax, max_depth)


@verify_greedy.register_fake
def _(tree_tokens, parents, target_argmax, max_depth):
    _check(tree_tokens, parents, target_argmax, max_depth)
    batch = tree_tokens.shape[0]
    return (
        tree_tokens.new_empty((batch,), dtype=torch.long),
        tree_tokens.new_empty((batch, max_depth + 1), dtype=torch.long),
        tree_tokens.new_empty((batch, max_depth + 1), dtype=torch.long),
    )
