"""Draft trees: the `parents` representation, what derives from it, and host-side helpers.

A tree of N nodes is `parents` int[N] (or int[B, N], one tree per sequence): node 0 is the root
(the last accepted token, whose K/V is not yet in the cache), `parents[0] = -1`, and
`parents[i] < i` for every other node, so nodes are in topological order. Siblings are ordered
by index: in a static tree the k-th child (in index order) of a node carries the draft's k-th most
likely token at that node (see `sibling_rank`).

Device side (plain torch; no host sync, no data-dependent Python control flow, fixed shapes, so
Dynamo traces them into the decode step):
  tree_depth(parents)     depth of every node, the root at depth 0
  ancestor_mask(parents)  mask[b, i, j] = j is i or an ancestor of i (the tree-attention mask)
Both use pointer jumping: after step s every node points at its 2^s-th ancestor (or the root),
so ceil(log2 N) gathers cover any depth.

Host side (lists and networkx; validation, dumps, tree-shape tuning):
  static_tree, tree_from_paths, validate_parents, sibling_rank, tree_to_networkx, draw_tree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

# The default static tree (static_tree("eagle")): 24 draft nodes + the root, depth 5, written
# as paths of sibling ranks in the Medusa/EAGLE "choices" format ((0, 1) = the root's top-1
# child's top-2 child). Chosen, as Sequoia and EAGLE-2 argue, by expected acceptance: model the
# draft's rank-r proposal as accepted with probability (0.6, 0.15, 0.06, 0.035)[r] given that its
# parent was (assumed rates, to be retuned from measured ones), score each path by the product
# along it, keep the 24 best. The result is wide near the root and a single top-1 chain at the bottom
# (4, 7, 7, 5, 1 nodes at depths 1..5). Under that model it accepts 2.28 draft tokens per step
# on average (plus the bonus token), against 1.38 for a chain of depth 5.
EAGLE_DEFAULT_PATHS: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 2, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0),
)


# ----------------------------------------------------------------------------- device side


def _pointers(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """parents as int64 [B, N] with every root pointing at itself; and the jump count."""
    if parents.dim() not in (1, 2):
        raise ValueError(f"parents must be [N] or [B, N], got shape {tuple(parents.shape)}")
    batched = parents if parents.dim() == 2 else parents[None]
    n = batched.shape[-1]
    nodes = torch.arange(n, device=parents.device).expand_as(batched)
    pointer = torch.where(batched < 0, nodes, batched.long())
    # Depth is at most N - 1 < 2^steps.
    return pointer, nodes, (n - 1).bit_length()


def tree_depth(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (int64, parents' shape); nodes with a negative parent are depth 0."""
    pointer, _, steps = _pointers(parents)
    # hops[i] = number of edges from i to pointer[i]; jumping doubles the span each step and
    # stops at the root, which points at itself with hops 0.
    hops = (parents if parents.dim() == 2 else parents[None]).ge(0).long()
    for _ in range(steps):
        hops = hops + hops.gather(1, pointer)
        pointer = pointer.gather(1, pointer)
    return hops if parents.dim() == 2 else hops[0]


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool [B, N, N] (or [N, N]): mask[b, i, j] is true iff node j is node i or an ancestor of it."""
    pointer, nodes, steps = _pointers(parents)
    batch, n = pointer.shape
    # Row i holds i's ancestors at distance < 2^s; the union with the row of its 2^s-th
    # ancestor covers distance < 2^(s+1). A root's row holds only itself, so clamping at the
    # root adds nothing wrong.
    mask = nodes[:, :, None] == nodes[:, None, :]
    for _ in range(steps):
        mask = mask | mask.gather(1, pointer[:, :, None].expand(batch, n, n))
        pointer = pointer.gather(1, pointer)
    return mask if parents.dim() == 2 else mask[0]


# ------------------------------------------------------------------------------- host side


def tree_from_paths(paths: Sequence[Sequence[int]]) -> list[int]:
    """Parents list of the tree whose non-root nodes are `paths` of sibling ranks.

    Nodes come out breadth-first (by depth, then by path), so parents precede children and
    siblings sit in rank order: node i's rank among its siblings is its path's last entry.
    Every prefix of a path must itself be a path, and every rank below a path's last one too.
    """
    unique = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents = [-1]
    for p in unique:
        if not p or min(p) < 0:
            raise ValueError(f"path {p} is not a non-empty tuple of ranks >= 0")
        if p[:-1] not in index:
            raise ValueError(f"path {p} has no parent: add {p[:-1]} to the paths")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in index:
            raise ValueError(
                f"path {p} skips rank {p[-1] - 1}: siblings take the draft's top-1, top-2, ... "
                f"tokens in order, so add {p[:-1] + (p[-1] - 1,)}"
            )
        index[p] = len(parents)
        parents.append(index[p[:-1]])
    return parents


def static_tree(kind: str, depth: int | None = None, branching: int | None = None) -> list[int]:
    """Parents list of a common static draft tree.

    "chain"  `depth` draft tokens in a line (depth + 1 nodes): plain speculative decoding.
    "full"   every node to `depth` has `branching` children (sum of branching^d nodes).
    "eagle"  the default sparse tree: 25 nodes, depth 5, wide near the root (EAGLE_DEFAULT_PATHS).
    """
    if kind == "chain":
        if depth is None or depth < 0:
            raise ValueError(f"static_tree('chain') needs depth >= 0, got depth={depth}")
        return [-1] + list(range(depth))
    if kind == "full":
        if depth is None or depth < 0 or branching is None or branching < 1:
            raise ValueError(
                f"static_tree('full') needs depth >= 0 and branching >= 1, got depth={depth}, "
                f"branching={branching}"
            )
        parents = [-1]
        level = [0]
        for _ in range(depth):
            next_level = []
            for node in level:
                for _ in range(branching):
                    next_level.append(len(parents))
                    parents.append(node)
            level = next_level
        return parents
    if kind == "eagle":
        if depth is not None or branching is not None:
            raise ValueError("static_tree('eagle') takes no depth or branching; use 'full' or tree_from_paths")
        return tree_from_paths(EAGLE_DEFAULT_PATHS)
    raise ValueError(f"unknown static tree kind {kind!r}; pick 'chain', 'full' or 'eagle'")


def _as_list(parents) -> list[int]:
    if isinstance(parents, torch.Tensor):
        if parents.dim() != 1:
            raise ValueError(f"expected one tree (a 1-D parents), got shape {tuple(parents.shape)}")
        return [int(p) for p in parents.tolist()]
    return [int(p) for p in parents]


def validate_parents(parents: Sequence[int] | torch.Tensor) -> None:
    """Raise ValueError, naming the offending index, unless `parents` is a valid specc tree.

    Valid: node 0 is the only root (parents[0] = -1) and 0 <= parents[i] < i otherwise, which
    makes it a tree rooted at 0 with nodes in topological order.
    """
    import networkx as nx

    parents = _as_list(parents)
    n = len(parents)
    if n == 0:
        raise ValueError("parents is empty: a tree has at least the root, parents = [-1]")
    if parents[0] != -1:
        raise ValueError(f"parents[0] = {parents[0]}, but node 0 is the root: set parents[0] = -1")
    for i in range(1, n):
        p = parents[i]
        if p < 0:
            raise ValueError(
                f"parents[{i}] = {p}: node {i} is a second root; only node 0 may have parent -1"
            )
        if p >= n:
            raise ValueError(f"parents[{i}] = {p} is not a node (the tree has {n} nodes)")
        if p == i:
            raise ValueError(f"parents[{i}] = {i}: node {i} is its own parent (a cycle)")
        if p > i:
            # Name a cycle if there is one: it is the more useful message.
            seen, node = [i], p
            while node > 0 and node not in seen and len(seen) <= n:
                seen.append(node)
                node = parents[node]
            if node in seen:
                loop = " -> ".join(str(x) for x in seen[seen.index(node):] + [node])
                raise ValueError(f"parents[{i}] = {p} closes a cycle {loop}; a tree has none")
            raise ValueError(
                f"parents[{i}] = {p} is not < {i}: nodes must be in topological order (every "
                f"parent before its children); renumber the nodes breadth-first"
            )
    graph = tree_to_networkx(parents)
    if not nx.is_arborescence(graph):  # cannot happen after the checks above; a safety net
        raise ValueError(f"parents {parents} is not a tree rooted at node 0")


def sibling_rank(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """For each node, its position among its parent's children (index order); -1 for the root.

    In a static tree, node i carries the draft's (rank + 1)-th most likely token at its parent.
    """
    parents = _as_list(parents)
    count: dict[int, int] = {}
    ranks = []
    for p in parents:
        if p < 0:
            ranks.append(-1)
            continue
        ranks.append(count.get(p, 0))
        count[p] = ranks[-1] + 1
    return ranks


def tree_to_networkx(parents: Sequence[int] | torch.Tensor):
    """The tree as a networkx DiGraph, edges parent -> child, each node with its 'depth'."""
    import networkx as nx

    parents = _as_list(parents)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(parents)))
    graph.add_edges_from((p, i) for i, p in enumerate(parents) if p >= 0)
    depth: dict[int, int] = {}
    for i, p in enumerate(parents):
        depth[i] = depth.get(p, -1) + 1 if 0 <= p < i else 0
    nx.set_node_attributes(graph, depth, "depth")
    return graph


def _layout(parents: list[int]) -> dict[int, tuple[float, float]]:
    """Tidy tree layout: leaves side by side in depth-first order, parents over their children."""
    children: dict[int, list[int]] = {i: [] for i in range(len(parents))}
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    position: dict[int, tuple[float, float]] = {}
    next_leaf = 0.0

    def place(node: int, depth: int) -> float:
        nonlocal next_leaf
        if not children[node]:
            x = next_leaf
            next_leaf += 1.0
        else:
            xs = [place(c, depth + 1) for c in children[node]]
            x = (xs[0] + xs[-1]) / 2
        position[node] = (x, -float(depth))
        return x

    for root in (i for i, p in enumerate(parents) if p < 0):
        place(root, 0)
    return position


def draw_tree(
    parents: Sequence[int] | torch.Tensor,
    tokens: Sequence | torch.Tensor | None = None,
    path: str | os.PathLike = "tree.png",
    *,
    accepted: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the tree to a PNG at `path` and return the path.

    Each node shows its index and, if given, its token (an id or decoded text); nodes listed in
    `accepted` (a verified path, say) are highlighted. Uses matplotlib's Agg canvas, no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parents = _as_list(parents)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if tokens is not None and len(tokens) != len(parents):
        raise ValueError(f"{len(tokens)} tokens for a tree of {len(parents)} nodes; pass one per node")
    highlighted = set(int(a) for a in accepted) if accepted is not None else set()
    position = _layout(parents)
    width = max((x for x, _ in position.values()), default=0.0) + 1
    depth = -min((y for _, y in position.values()), default=0.0) + 1

    fig = Figure(figsize=(max(3.0, 0.9 * width), max(2.0, 1.1 * depth)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, p in enumerate(parents):
        if p >= 0:
            (x0, y0), (x1, y1) = position[p], position[i]
            both = i in highlighted and p in highlighted
            ax.plot([x0, x1], [y0, y1], color="tab:red" if both else "0.6", lw=2 if both else 1, zorder=1)
    for i, (x, y) in position.items():
        ax.scatter([x], [y], s=420, zorder=2, edgecolors="black",
                   color="tab:red" if i in highlighted else ("gold" if i == 0 else "white"))
        ax.text(x, y, str(i), ha="center", va="center", fontsize=8, zorder=3)
        if tokens is not None:
            ax.text(x, y - 0.3, repr(tokens[i]) if isinstance(tokens[i], str) else str(tokens[i]),
                    ha="center", va="top", fontsize=7, zorder=3)
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.3, 0.7)
    ax.set_axis_off()
    ax.set_title(title or f"draft tree: {len(parents)} nodes, depth {int(depth) - 1}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
