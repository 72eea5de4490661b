"""specc::select_tree: the reference against its definition written out in Python, and the Triton
kernel against the reference (interpreter on CPU, compiled on a GPU), on candidate sets drafted
as passes/speculative_step.py::_draft_dynamic drafts them, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering.select_tree import select_tree_reference
from specc.lowering.tree import validate_parents
from specc.passes.speculative_step import DynamicTree, dynamic_candidate_depth
from tests.lowering.interpreter import interpreted

SENTINEL = 7777

# Tied log q: siblings, cousins and levels share scores, and log q = 0 gives a child its
# parent's score exactly; -inf is what log_softmax gives a token of probability 0.
TIED_LOG_Q = (0.0, -0.5, -1.0, -2.0, float("-inf"))


@st.composite
def candidate_sets(draw, max_batch: int = 3, max_top_k: int = 4, max_depth: int = 4) -> dict:
    top_k = draw(st.integers(1, max_top_k))
    depth = draw(st.integers(1, max_depth))
    spec = DynamicTree(top_k=top_k, depth=depth, size=2)
    return dict(
        batch=draw(st.integers(1, max_batch)),
        top_k=top_k,
        depth=depth,
        n_nodes=draw(st.integers(1, spec.candidates + 1)),
        tied=draw(st.booleans()),
        # |score| >= 16: where a float32 1e-6 depth penalty rounds away
        offset=draw(st.sampled_from([0.0, -24.0, -1000.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        token_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        parent_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
    )


def draft_candidates(case: dict, device="cpu"):
    """The op's inputs, built as _draft_dynamic builds them: per level, each of the top_k
    frontier candidates proposes top_k children with log q in descending order (a topk), whose
    float32 scores are the parent's plus log q; the next frontier is the level's top_k."""
    generator = torch.Generator().manual_seed(case["seed"])
    batch, k = case["batch"], case["top_k"]

    def log_q(*shape):
        if case["tied"]:
            choice = torch.randint(len(TIED_LOG_Q), shape, generator=generator)
            values = torch.tensor(TIED_LOG_Q)[choice]
        else:
            values = -3.0 * torch.rand(shape, generator=generator)
        return values.sort(dim=-1, descending=True).values

    def tokens(*shape):
        return torch.randint(0, 50, shape, generator=generator)

    frontier_scores = case["offset"] + log_q(batch, k)
    cand_tokens, cand_scores = [tokens(batch, k)], [frontier_scores]
    cand_parents = [torch.full((batch, k), -1)]
    frontier_cand = torch.arange(k).expand(batch, k)
    n_cand = k
    for _ in range(1, case["depth"]):
        scores = (frontier_scores[:, :, None] + log_q(batch, k, k)).flatten(1)  # float32, [B, k * k]
        cand_tokens.append(tokens(batch, k * k))
        cand_scores.append(scores)
        cand_parents.append(frontier_cand[:, :, None].expand(batch, k, k).flatten(1))
        best = scores.argsort(dim=-1, descending=True, stable=True)[:, :k]
        frontier_scores, frontier_cand = scores.gather(1, best), n_cand + best
        n_cand += k * k
    depth = dynamic_candidate_depth(DynamicTree(top_k=k, depth=case["depth"], size=2), device)
    return (
        tokens(batch).to(device),
        torch.cat(cand_tokens, 1).to(device, case["token_dtype"]),
        torch.cat(cand_scores, 1).to(device),
        torch.cat(cand_parents, 1).to(device, case["parent_dtype"]),
        depth,
    )


def select_by_definition(root, cand_tokens, cand_scores, cand_parents, cand_depth, n_nodes):
    """The op's definition, one sequence at a time in plain Python."""
    outputs = ([], [], [])
    depth = cand_depth.tolist()
    for b in range(cand_tokens.shape[0]):
        scores, parents, tokens = cand_scores[b].tolist(), cand_parents[b].tolist(), cand_tokens[b].tolist()
        ranking = sorted(range(len(scores)), key=lambda c: (-scores[c], depth[c], c))
        nodes = sorted(ranking[: n_nodes - 1], key=lambda c: (depth[c], -scores[c], c))
        node_of = {c: n + 1 for n, c in enumerate(nodes)}
        outputs[0].append([int(root[b])] + [tokens[c] for c in nodes])
        outputs[1].append([-1] + [node_of.get(parents[c], 0) for c in nodes])
        outputs[2].append([-1] + nodes)
    return tuple(torch.tensor(rows, dtype=torch.long) for rows in outputs)


@settings(max_examples=150, deadline=None)
@given(case=candidate_sets(max_top_k=5, max_depth=5))
def test_reference_is_the_ranking_definition_and_keeps_a_tree(case):
    inputs = draft_candidates(case)
    got = select_tree_reference(*inputs, case["n_nodes"])
    want = select_by_definition(*inputs, case["n_nodes"])
    for g, w in zip(got, want):
        assert torch.equal(g, w), (case, g, w)
    # Scores never rise along a path, so every kept candidate's parent is kept: a real tree
    # in topological order (no kept candidate was re-hung off the root).
    tree_tokens, parents, chosen = got
    cand_parents = inputs[3]
    for b in range(case["batch"]):
        validate_parents(parents[b])
        for node in range(1, case["n_nodes"]):
            parent_cand = int(cand_parents[b, chosen[b, node]])
            assert int(chosen[b, parents[b, node]]) == parent_cand, (case, b, node)


def test_equal_scores_keep_the_parent_then_the_lower_index():
    # Candidates 0, 1 at depth 1 and their children 2 (of 0) and 3 (of 1), all scoring -20:
    # a tree of 3 keeps the two parents (shallower), not a child; of 2 it keeps candidate 0.
    root, tokens = torch.tensor([9]), torch.tensor([[10, 11, 12, 13]])
    scores, parents = torch.full((1, 4), -20.0), torch.tensor([[-1, -1, 0, 1]])
    depth = torch.tensor([1, 1, 2, 2])
    assert select_tree_reference(root, tokens, scores, parents, depth, 3)[2].tolist() == [[-1, 0, 1]]
    assert select_tree_reference(root, tokens, scores, parents, depth, 2)[2].tolist() == [[-1, 0]]
    # Among the kept, depth first, then score: the higher-scoring child of 1 before 0's child.
    scores = torch.tensor([[-1.0, -2.0, -3.0, -2.5]])
    assert select_tree_reference(root, tokens, scores, parents, depth, 5)[2].tolist() == [[-1, 0, 1, 3, 2]]


def test_op_checks_shapes_and_passes_opcheck():
    inputs = draft_candidates(dict(batch=2, top_k=2, depth=3, n_nodes=5, tied=True, offset=0.0, seed=1,
                                   token_dtype=torch.int64, parent_dtype=torch.int64))
    root, tokens, scores, parents, depth = inputs
    with pytest.raises(ValueError, match="needs at least 11 candidates, got 10"):
        torch.ops.specc.select_tree(*inputs, 12)
    with pytest.raises(ValueError, match=r"cand_depth \[10\]"):
        torch.ops.specc.select_tree(root, tokens, scores, parents, depth[None].expand(2, 10), 5)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.specc.select_tree(root, tokens, scores[:, :4], parents, depth, 5)
    torch.library.opcheck(torch.ops.specc.select_tree.default, (*inputs, 5))


# ------------------------------------------------------------------------------ the kernel


def check_kernel_against_reference(case: dict, device: str, inputs=None) -> None:
    from specc.lowering.select_tree_triton import select_tree_triton

    inputs = inputs if inputs is not None else draft_candidates(case, device)
    batch, n_nodes = inputs[1].shape[0], case["n_nodes"]
    # Poisoned outputs: an entry the kernel forgets to write keeps the sentinel and fails.
    out = tuple(torch.full((batch, n_nodes), SENTINEL, dtype=torch.long, device=device) for _ in range(3))
    got = select_tree_triton(*inputs, n_nodes, out=out)
    want = select_tree_reference(*inputs, n_nodes)
    for name, g, w in zip(("tree_tokens", "parents", "chosen"), got, want):
        assert torch.equal(g, w), f"{case}: {name}\nkernel    {g.tolist()}\nreference {w.tolist()}"


@settings(max_examples=40, deadline=None)
@given(case=candidate_sets())
def _kernel_property_in_interpreter(case):
    check_kernel_against_reference(case, "cpu")


@interpreted
def test_kernel_equals_reference_in_interpreter():
    from specc.lowering.codegen import all_generated_sources
    from specc.lowering.select_tree_triton import generated_sources, kernel_source

    _kernel_property_in_interpreter()
    # EAGLE-2's default tree (top_k 8, depth 6: 328 candidates, 48 nodes), with ties, every
    # node kept, and only the root.
    eagle = dict(batch=2, top_k=8, depth=6, n_nodes=48, tied=True, offset=-24.0, seed=3,
                 token_dtype=torch.int64, parent_dtype=torch.int64)
    for n_nodes in (48, 329, 1):
        check_kernel_against_reference({**eagle, "n_nodes": n_nodes}, "cpu")
    # Strided inputs: candidates as column views of [C, B] tensors.
    root, tokens, scores, parents, depth = draft_candidates({**eagle, "depth": 3, "n_nodes": 20}, "cpu")
    strided = (root, tokens.t().contiguous().t(), scores.t().contiguous().t(), parents.t().contiguous().t(), depth)
    check_kernel_against_reference({**eagle, "depth": 3, "n_nodes": 20}, "cpu", strided)
    # Scores rising along a path (never drafted): kept candidate 2's parent 0 is not kept, so
    # node 2 hangs off the root, as in the reference.
    rising = (torch.tensor([9]), torch.tensor([[10, 11, 12]]), torch.tensor([[-5.0, -1.0, -0.5]]),
              torch.tensor([[-1, -1, 0]]), torch.tensor([1, 1, 2]))
    assert select_tree_reference(*rising, 3)[1].tolist() == [[-1, 0, 0]]
    check_kernel_against_reference({"n_nodes": 3}, "cpu", rising)
    source = kernel_source(n_cand=328, n_nodes=48)
    assert "N_CAND = tl.constexpr(328)" in source and "KEEP = tl.constexpr(47)" in source
    assert source in generated_sources().values()
    assert source in all_generated_sources().values()
    assert all(name.endswith(".py") for name in all_generated_sources())


@interpreted
def test_kernel_programs_cover_every_candidate_block_in_interpreter():
    # The kernels run cdiv(C, BLOCK_I) programs per sequence; these cases span several blocks,
    # the last one partial, so a program that misplaces its block (or a root left to a block
    # that is not there) leaves sentinels behind or writes another sequence's nodes.
    from specc.lowering.select_tree_triton import _blocks

    # top_k 8, depth 8: 456 candidates, EAGLE-2's large tree; top_k 3, depth 3: 21 candidates;
    # top_k 10, depth 8: 710 candidates, compared in two steps of BLOCK_J, the second partial.
    for top_k, depth in ((8, 8), (3, 3), (10, 8)):
        n_cand = top_k + (depth - 1) * top_k * top_k
        block_i, block_j = _blocks(n_cand)
        assert n_cand > block_i and n_cand % block_i != 0, (n_cand, block_i)
        assert (n_cand > block_j) == (top_k == 10), (n_cand, block_j)
        for n_nodes, tied in ((1, True), (2, True), (7, True), (min(64, n_cand), True), (min(64, n_cand), False),
                              (n_cand + 1, True)):
            case = dict(batch=3, top_k=top_k, depth=depth, n_nodes=n_nodes, tied=tied, offset=-24.0,
                        seed=n_nodes, token_dtype=torch.int64, parent_dtype=torch.int32)
            check_kernel_against_reference(case, "cpu")
    # One partial block (top_k 2, depth 2: 6 candidates): only program 0 can write the root.
    check_kernel_against_reference(dict(batch=2, top_k=2, depth=2, n_nodes=4, tied=True, offset=0.0, seed=4,
                                        token_dtype=torch.int64, parent_dtype=torch.int64), "cpu")
    # Each candidate the child of the one before it, five to a level. Every score equal: the
    # order is depth, then index, across blocks. Scores rising with the index in sequence 0
    # (never drafted; the reference still defines the output) and falling in sequence 1: in 0
    # the kept candidates lie in the last, partial block and their parents, kept or not, before.
    n_cand, batch = 37, 2
    root = torch.tensor([5, 6])
    tokens = torch.arange(batch * n_cand).reshape(batch, n_cand)
    depth = torch.arange(n_cand) // 5 + 1
    chain = torch.arange(-1, n_cand - 1).expand(batch, n_cand)
    flat = (root, tokens, torch.full((batch, n_cand), -3.0), chain, depth)
    rising = (root, tokens, torch.stack([torch.arange(n_cand) * 0.5, -torch.arange(n_cand) * 0.5]).float(), chain, depth)
    for inputs in (flat, rising):
        for n_nodes in (1, 6, 20, n_cand + 1):
            check_kernel_against_reference({"n_nodes": n_nodes}, "cpu", inputs)


@pytest.mark.gpu
@settings(max_examples=60, deadline=None)
@given(case=candidate_sets(max_batch=8, max_top_k=10, max_depth=8))
def test_kernel_equals_reference_on_gpu(case):
    check_kernel_against_reference(case, "cuda")
    # and through the op, which dispatches CUDA tensors to the kernel
    inputs = draft_candidates(case, "cuda")
    got = torch.ops.specc.select_tree(*inputs, case["n_nodes"])
    want = select_tree_reference(*(t.cpu() for t in inputs), case["n_nodes"])
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w), case
