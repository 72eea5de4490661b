"""lowering/tree.py: depth and ancestor mask against networkx, static trees, validation, drawing."""

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specc.lowering.tree import (
    EAGLE_DEFAULT_PATHS,
    ancestor_mask,
    draw_tree,
    sibling_rank,
    static_tree,
    tree_depth,
    tree_from_paths,
    tree_to_networkx,
    validate_parents,
)
from tests.strategies import tree_parents


@st.composite
def batched_trees(draw, max_batch: int = 3, max_nodes: int = 20) -> list[list[int]]:
    """B random trees of one size N (each sequence has its own tree)."""
    n = draw(st.integers(1, max_nodes))
    return draw(st.lists(tree_parents(min_nodes=n, max_nodes=n), min_size=1, max_size=max_batch))


@settings(max_examples=60, deadline=None)
@given(trees=batched_trees(), dtype=st.sampled_from([torch.int32, torch.int64]))
def test_tree_depth_is_networkx_shortest_path_from_root(trees, dtype):
    depth = tree_depth(torch.tensor(trees, dtype=dtype))
    assert depth.dtype == torch.long and depth.shape == (len(trees), len(trees[0]))
    for b, parents in enumerate(trees):
        expected = nx.shortest_path_length(tree_to_networkx(parents), source=0)
        assert depth[b].tolist() == [expected[i] for i in range(len(parents))]


@settings(max_examples=60, deadline=None)
@given(trees=batched_trees(), dtype=st.sampled_from([torch.int32, torch.int64]))
def test_ancestor_mask_is_self_or_networkx_ancestor(trees, dtype):
    mask = ancestor_mask(torch.tensor(trees, dtype=dtype))
    assert mask.dtype == torch.bool and mask.shape == (len(trees), len(trees[0]), len(trees[0]))
    for b, parents in enumerate(trees):
        graph = tree_to_networkx(parents)
        for i in range(len(parents)):
            expected = nx.ancestors(graph, i) | {i}
            assert set(torch.nonzero(mask[b, i]).flatten().tolist()) == expected, (b, i, parents)


def test_tree_helpers_take_a_single_unbatched_tree():
    parents = static_tree("eagle")
    one = torch.tensor(parents)
    assert torch.equal(tree_depth(one), tree_depth(one[None])[0])
    assert torch.equal(ancestor_mask(one), ancestor_mask(one[None])[0])


def test_deep_chain_needs_every_pointer_jump():
    # Depth N - 1 is the worst case for log2(N) jumps; 2^k + 1 nodes need one more jump than 2^k.
    for n in (1, 2, 3, 4, 5, 16, 17, 33):
        chain = torch.tensor(static_tree("chain", depth=n - 1))
        assert tree_depth(chain).tolist() == list(range(n))
        assert torch.equal(ancestor_mask(chain), torch.ones(n, n, dtype=torch.bool).tril())


def test_static_chain_and_full_trees_have_the_stated_shape():
    assert static_tree("chain", depth=4) == [-1, 0, 1, 2, 3]
    assert static_tree("chain", depth=0) == [-1]
    full = static_tree("full", depth=3, branching=2)
    assert len(full) == 1 + 2 + 4 + 8
    children = [full.count(i) for i in range(len(full))]
    depth = tree_depth(torch.tensor(full)).tolist()
    assert all(children[i] == (2 if depth[i] < 3 else 0) for i in range(len(full)))
    assert sibling_rank(full)[1:] == [0, 1] * 7


def test_eagle_default_tree_is_25_nodes_depth_5_and_densest_near_root():
    parents = static_tree("eagle")
    validate_parents(parents)
    depth = tree_depth(torch.tensor(parents)).tolist()
    per_depth = [depth.count(d) for d in range(max(depth) + 1)]
    assert len(parents) == 25 and max(depth) == 5
    assert per_depth == [1, 4, 7, 7, 5, 1]
    # Node i's path of sibling ranks is its entry of EAGLE_DEFAULT_PATHS.
    ranks = sibling_rank(parents)
    for i, path in enumerate(EAGLE_DEFAULT_PATHS, start=1):
        node, walked = i, []
        while node > 0:
            walked.append(ranks[node])
            node = parents[node]
        assert tuple(reversed(walked)) == path


@settings(max_examples=40, deadline=None)
@given(parents=tree_parents(max_nodes=24))
def test_tree_from_paths_rebuilds_a_breadth_first_tree(parents):
    # Renumber breadth-first with siblings kept in index order, as tree_from_paths orders nodes.
    ranks = sibling_rank(parents)
    paths = {}
    for i in range(1, len(parents)):
        paths[i] = paths.get(parents[i], ()) + (ranks[i],)
    rebuilt = tree_from_paths(paths.values())
    validate_parents(rebuilt)
    assert nx.is_isomorphic(tree_to_networkx(rebuilt), tree_to_networkx(parents))
    assert sorted(tree_depth(torch.tensor(rebuilt)).tolist()) == sorted(tree_depth(torch.tensor(parents)).tolist())


@pytest.mark.parametrize(
    "paths, message",
    [([(0, 0)], r"path \(0, 0\) has no parent"), ([(1,)], "skips rank 0"), ([()], "non-empty")],
)
def test_tree_from_paths_rejects_gaps(paths, message):
    with pytest.raises(ValueError, match=message):
        tree_from_paths(paths)


@settings(max_examples=40, deadline=None)
@given(parents=tree_parents(max_nodes=24))
def test_validate_parents_accepts_every_topological_tree(parents):
    validate_parents(parents)
    validate_parents(torch.tensor(parents, dtype=torch.int32))


@pytest.mark.parametrize(
    "parents, message",
    [
        ([], "empty"),
        ([0, 0], r"parents\[0\] = 0"),
        ([-1, 0, -1], r"parents\[2\] = -1: node 2 is a second root"),
        ([-1, 0, 2], r"parents\[2\] = 2: node 2 is its own parent"),
        ([-1, 0, 3, 2], r"parents\[2\] = 3 closes a cycle 2 -> 3 -> 2"),
        ([-1, 2, 0], r"parents\[1\] = 2 is not < 1: nodes must be in topological order"),
        ([-1, 0, 7], r"parents\[2\] = 7 is not a node"),
    ],
)
def test_validate_parents_names_the_offending_index(parents, message):
    with pytest.raises(ValueError, match=message):
        validate_parents(parents)


@pytest.mark.parametrize("call", [lambda: static_tree("chain"), lambda: static_tree("full", depth=2),
                                  lambda: static_tree("eagle", depth=3), lambda: static_tree("star")])
def test_static_tree_rejects_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_draw_tree_writes_a_png(tmp_path):
    parents = static_tree("eagle")
    out = draw_tree(parents, [f"t{i}" for i in range(len(parents))], tmp_path / "dump" / "tree.png",
                    accepted=[0, 1, 5])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(ValueError, match="3 tokens for a tree of 25 nodes"):
        draw_tree(parents, [1, 2, 3], tmp_path / "bad.png")
