"""specc::verify_greedy: the reference against a brute-force walk and against plain greedy
decoding, the Triton kernel against the reference (interpreter on CPU, compiled on a GPU), and the
op inside a torch.compile(fullgraph=True) decode-step tail."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.tree import ancestor_mask, static_tree, tree_depth
from specc.lowering.verify_greedy import verify_greedy_reference
from tests.lowering.interpreter import interpreted
from tests.strategies import tree_parents

SENTINEL = 7777


def greedy_walk(tokens: list[int], parents: list[int], argmax: list[int], max_depth: int):
    """Brute force: the accepted nodes (root first) and the emitted tokens."""
    path = [0]
    while len(path) <= max_depth:
        node = path[-1]
        matches = [x for x in range(len(parents)) if parents[x] == node and tokens[x] == argmax[node]]
        if not matches:
            break
        path.append(min(matches))
    return path, [tokens[x] for x in path[1:]] + [argmax[path[-1]]]


def expected_outputs(tokens, parents, argmax, max_depth):
    accept, paths, outs = [], [], []
    for b in range(len(parents)):
        path, emitted = greedy_walk(tokens[b], parents[b], argmax[b], max_depth)
        accept.append(len(path) - 1)
        paths.append(path + [0] * (max_depth + 1 - len(path)))
        outs.append(emitted + [-1] * (max_depth + 1 - len(emitted)))
    return torch.tensor(accept), torch.tensor(paths), torch.tensor(outs)


@st.composite
def verify_cases(draw, max_batch: int = 3, max_nodes: int = 16, vocab: int = 3):
    """Random trees (one per sequence, same N), tokens from a tiny vocabulary so that matches and
    duplicate siblings are common, random argmaxes, and max_depth from 0 to the deepest tree."""
    n = draw(st.integers(1, max_nodes))
    parents = draw(st.lists(tree_parents(min_nodes=n, max_nodes=n), min_size=1, max_size=max_batch))
    batch = len(parents)
    tokens = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n), min_size=batch, max_size=batch))
    argmax = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n), min_size=batch, max_size=batch))
    deepest = int(tree_depth(torch.tensor(parents)).max())
    max_depth = draw(st.integers(0, deepest))
    return tokens, parents, argmax, max_depth


@settings(max_examples=150, deadline=None)
@given(case=verify_cases())
def test_reference_equals_brute_force_walk(case):
    tokens, parents, argmax, max_depth = case
    got = verify_greedy_reference(torch.tensor(tokens), torch.tensor(parents, dtype=torch.int32),
                                  torch.tensor(argmax), max_depth)
    for g, e in zip(got, expected_outputs(tokens, parents, argmax, max_depth)):
        assert g.dtype == torch.long and torch.equal(g, e)


def next_token(context: tuple[int, ...], vocab: int, salt: int) -> int:
    """A deterministic stand-in for the target's greedy choice after `context`."""
    return hash((salt,) + context) % vocab


@settings(max_examples=100, deadline=None)
@given(parents=tree_parents(max_nodes=16), vocab=st.integers(1, 4), salt=st.integers(0, 10**6),
       data=st.data())
def test_emitted_tokens_are_plain_greedy_decoding(parents, vocab, salt, data):
    # The losslessness argument at op level: if target_argmax[i] is the target's greedy token after
    # the root's context plus the tokens on the way to node i, the emitted tokens are exactly the
    # next accept_len + 1 tokens of plain greedy decoding, and no longer greedy prefix was in the tree.
    n = len(parents)
    tokens = [0] + data.draw(st.lists(st.integers(0, vocab - 1), min_size=n - 1, max_size=n - 1))
    context = {0: (17,)}
    for i in range(1, n):
        context[i] = context[parents[i]] + (tokens[i],)
    argmax = [next_token(context[i], vocab, salt) for i in range(n)]
    max_depth = int(tree_depth(torch.tensor(parents)).max())
    accept, path, out = verify_greedy_reference(
        torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([argmax]), max_depth)
    a = int(accept[0])
    plain = []
    for _ in range(a + 1):
        plain.append(next_token((17,) + tuple(plain), vocab, salt))
    assert out[0, : a + 1].tolist() == plain
    assert (out[0, a + 1:] == -1).all() and (path[0, a + 1:] == 0).all()
    last = int(path[0, a])
    assert not any(parents[x] == last and tokens[x] == plain[-1] for x in range(n)), "stopped too early"


@settings(max_examples=60, deadline=None)
@given(trees=st.lists(tree_parents(min_nodes=8, max_nodes=8), min_size=1, max_size=3), data=st.data())
def test_perfect_oracle_accepts_the_whole_path_to_any_leaf(trees, data):
    # Distinct tokens per node; the target agrees with the path to one chosen leaf per sequence.
    tokens = torch.arange(100, 108).repeat(len(trees), 1)
    argmax = torch.full_like(tokens, 99)
    max_depth = int(tree_depth(torch.tensor(trees)).max())
    expected_paths = []
    for b, parents in enumerate(trees):
        leaves = [i for i in range(8) if i not in parents]
        node = data.draw(st.sampled_from(leaves))
        chain = [node]
        while parents[chain[-1]] >= 0:
            chain.append(parents[chain[-1]])
        chain.reverse()
        for parent, child in zip(chain, chain[1:]):
            argmax[b, parent] = tokens[b, child]
        expected_paths.append(chain)
    accept, path, out = verify_greedy_reference(tokens, torch.tensor(trees), argmax, max_depth)
    for b, chain in enumerate(expected_paths):
        a = len(chain) - 1
        assert int(accept[b]) == a
        assert path[b, : a + 1].tolist() == chain
        assert out[b, :a].tolist() == tokens[b, chain[1:]].tolist() and int(out[b, a]) == 99


def test_full_depth_acceptance_on_static_trees():
    for parents in (static_tree("eagle"), static_tree("full", depth=3, branching=2), static_tree("chain", depth=4)):
        n = len(parents)
        depth = tree_depth(torch.tensor(parents))
        deepest = int(depth.max())
        leaf = int(depth.argmax())
        tokens = torch.arange(n)[None] + 10
        argmax = torch.zeros(1, n, dtype=torch.long)
        node = leaf
        while parents[node] >= 0:
            argmax[0, parents[node]] = tokens[0, node]
            node = parents[node]
        accept, path, out = verify_greedy_reference(tokens, torch.tensor([parents]), argmax, deepest)
        assert int(accept[0]) == deepest and int(path[0, -1]) == leaf
        assert out[0].tolist() == tokens[0, path[0, 1:]].tolist() + [0]


def test_duplicate_sibling_tokens_take_the_lowest_index_and_max_depth_caps():
    parents = torch.tensor([[-1, 0, 0, 2, 1, 4]])
    tokens = torch.tensor([[9, 5, 5, 6, 6, 7]])
    argmax = torch.tensor([[5, 6, 6, 0, 7, 3]])
    accept, path, out = verify_greedy_reference(tokens, parents, argmax, 3)
    assert accept.tolist() == [3] and path.tolist() == [[0, 1, 4, 5]] and out.tolist() == [[5, 6, 7, 3]]
    accept, path, out = verify_greedy_reference(tokens, parents, argmax, 1)
    assert accept.tolist() == [1] and path.tolist() == [[0, 1]] and out.tolist() == [[5, 6]]
    accept, path, out = verify_greedy_reference(tokens[:, :1], parents[:, :1], argmax[:, :1], 0)
    assert accept.tolist() == [0] and path.tolist() == [[0]] and out.tolist() == [[5]]


def test_op_checks_shapes_and_passes_opcheck():
    tokens, parents = torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_depth=3 for a tree of 3 nodes"):
        torch.ops.specc.verify_greedy(tokens, parents, tokens, 3)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.specc.verify_greedy(tokens, parents[:, :2], tokens, 1)
    torch.library.opcheck(torch.ops.specc.verify_greedy.default, (tokens, parents, torch.tensor([[2, 3, 0]]), 2))


def check_kernel_against_reference(case, device: str, dtypes) -> None:
    from specc.lowering.verify_greedy_triton import launch_verify_greedy

    tokens, parents, argmax, max_depth = case
    token_dtype, parent_dtype = dtypes
    tokens = torch.tensor(tokens, dtype=token_dtype, device=device)
    parents = torch.tensor(parents, dtype=parent_dtype, device=device)
    argmax = torch.tensor(argmax, dtype=token_dtype, device=device)
    batch = tokens.shape[0]
    # Poisoned outputs: an entry the kernel forgets to write keeps the sentinel and fails.
    accept = torch.full((batch,), SENTINEL, dtype=torch.long, device=device)
    path = torch.full((batch, max_depth + 1), SENTINEL, dtype=torch.long, device=device)
    out = torch.full((batch, max_depth + 1), SENTINEL, dtype=torch.long, device=device)
    launch_verify_greedy(tokens, parents, argmax, accept, path, out)
    for got, want in zip((accept, path, out), verify_greedy_reference(tokens, parents, argmax, max_depth)):
        assert torch.equal(got, want), (case, got, want)


@settings(max_examples=40, deadline=None)
@given(case=verify_cases(max_nodes=20),
       dtypes=st.sampled_from([(torch.int64, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int32)]))
def _kernel_property_in_interpreter(case, dtypes):
    check_kernel_against_reference(case, "cpu", dtypes)


@interpreted
def test_kernel_equals_reference_in_interpreter():
    _kernel_property_in_interpreter()
    # The default tree at its full size, where every walk can reach depth 5.
    parents = [static_tree("eagle")] * 2
    check_kernel_against_reference(
        ([[i % 2 for i in range(25)]] * 2, parents, [[1] * 25, [0] * 25], 5), "cpu", (torch.int64, torch.int32))
    from specc.lowering.verify_greedy_triton import generated_sources

    assert any("MAX_DEPTH = tl.constexpr(5)" in s for s in generated_sources().values())


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(case=verify_cases(max_nodes=64, vocab=2),
       dtypes=st.sampled_from([(torch.int64, torch.int32), (torch.int32, torch.int64)]))
def test_kernel_equals_reference_on_gpu(case, dtypes):
    check_kernel_against_reference(case, "cuda", dtypes)


@pytest.mark.slow
def test_decode_step_tail_compiles_fullgraph():
    """ancestor_mask, tree_depth, verify_greedy and commit_kv in one Inductor graph on the CPU."""

    def step_tail(tokens, parents, argmax, k_cache, v_cache, cache_len):
        mask = ancestor_mask(parents)
        depth = tree_depth(parents)
        accept, path, out = torch.ops.specc.verify_greedy(tokens, parents, argmax, 3)
        torch.ops.specc.commit_kv(k_cache, v_cache, cache_len, path, accept)
        return mask, depth, accept, path, out, cache_len + accept + 1

    parents = torch.tensor([static_tree("full", depth=3, branching=2)] * 2, dtype=torch.int32)
    tokens = torch.randint(0, 2, (2, 15))
    argmax = torch.randint(0, 2, (2, 15))
    k_cache, v_cache = torch.randn(2, 2, 2, 24, 4), torch.randn(2, 2, 2, 24, 4)
    cache_len = torch.tensor([3, 6])
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    want = step_tail(tokens, parents, argmax, eager_k, eager_v, cache_len)
    got = torch.compile(step_tail, fullgraph=True)(tokens, parents, argmax, k_cache, v_cache, cache_len)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)
