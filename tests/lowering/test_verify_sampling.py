"""specc::verify_sampling: the emitted tokens are distributed as the target's (lowering/verify_sampling.py).

The statistical tests decode with a toy language model: a table of target and draft next-token
distributions indexed by (position, previous token), so a node's distributions depend on the
token it carries and on its depth. For many independent trials at once (the batch dimension),
the tree is drawn as the decode step draws it (each node's children sampled from the draft
without replacement, gumbel_top_k), the op verifies it, and the first emitted tokens are
compared with the target's by chi-square at a fixed false-alarm rate (test_sampling.ALPHA):
  first token  t1 ~ p(. | root)
  first pair   (t1, t2) ~ p(t1 | root) p(t2 | t1), where t2 is the op's second output token,
               or, after a step that emitted one token, the first token of the next step (a
               fresh tree rooted at t1 with the next counter): the token stream the runtime sees.
Every random number comes from sampling.uniform with fixed seeds, so verdicts are reproducible.
The same harness, given a deliberately wrong rule, must reject it (test_wrong_rules_are_caught).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc.lowering  # noqa: F401  (registers the ops)
from specc.lowering import verify_sampling as vs
from specc.lowering.sampling import gumbel_top_k, shape_logits
from tests.lowering.interpreter import interpreted
from tests.lowering.test_sampling import chi_square, counts

verify_sampling = torch.ops.specc.verify_sampling
ROOT = 0  # the token every decoded stream starts after


# --------------------------------------------------------------------------------------------
# The harness: a toy language model, trees drawn from its draft, the emitted token stream.
# --------------------------------------------------------------------------------------------


@dataclass
class ToyModel:
    """target[pos, prev] and draft[pos, prev]: distributions [V] of the token after `prev` at `pos`."""

    target: torch.Tensor  # [P, V, V]
    draft: torch.Tensor  # [P, V, V]

    @property
    def vocab(self) -> int:
        return self.target.shape[-1]

    def pair_probs(self) -> np.ndarray:
        """P(t1, t2) = p(t1 | ROOT) p(t2 | t1)."""
        first = self.target[0, ROOT].double()
        return (first[:, None] * self.target[1].double()).numpy()


def toy_model(seed: int, vocab: int, positions: int, temperature=1.0, top_k=0, top_p=1.0) -> ToyModel:
    """Random target logits and a draft that is correlated with the target but clearly differs."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = 1.5 * torch.randn(positions, vocab, vocab, generator=gen)
    draft_logits = 0.7 * target_logits + 1.2 * torch.randn(positions, vocab, vocab, generator=gen)
    return ToyModel(
        shape_logits(target_logits, temperature, top_k, top_p),
        shape_logits(draft_logits, temperature, top_k, top_p),
    )


def node_depths(parents: list[int]) -> list[int]:
    depths = [0]
    for i in range(1, len(parents)):
        depths.append(depths[parents[i]] + 1)
    return depths


def draw_tree(
    model: ToyModel,
    parents: list[int],
    root_tokens: torch.Tensor,
    position: int,
    seed: torch.Tensor,
    counter: torch.Tensor,
    children: str = "sampled",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tree_tokens [B, N], target_probs [B, N, V], draft_probs [B, N, V]) for one decode step.

    Node 0 carries root_tokens at `position`. children="sampled": each node's children are
    successive draws without replacement from its draft distribution (gumbel_top_k, noise
    named by the node index); "ranked": its k most likely draft tokens (a static EAGLE tree).
    """
    batch, n = root_tokens.shape[0], len(parents)
    depths = node_depths(parents)
    tokens = torch.zeros(batch, n, dtype=torch.long)
    tokens[:, 0] = root_tokens
    target_probs = torch.zeros(batch, n, model.vocab)
    draft_probs = torch.zeros(batch, n, model.vocab)
    for i in range(n):
        target_probs[:, i] = model.target[position + depths[i], tokens[:, i]]
        draft_probs[:, i] = model.draft[position + depths[i], tokens[:, i]]
        kids = [c for c in range(i + 1, n) if parents[c] == i]
        if not kids:
            continue
        if children == "sampled":
            drawn, _ = gumbel_top_k(draft_probs[:, i : i + 1].log(), len(kids), seed, counter, torch.tensor([[i]]))
            tokens[:, kids] = drawn[:, 0]
        else:
            tokens[:, kids] = draft_probs[:, i].topk(len(kids), dim=-1).indices
    return tokens, target_probs, draft_probs


def first_two_tokens(
    model: ToyModel, parents: list[int], max_depth: int, trials: int, seed: int, rule: str = "rrs",
    children: str = "sampled",
) -> torch.Tensor:
    """[trials, 2]: the first two tokens of the stream that decoding from ROOT emits."""
    seeds = torch.arange(trials, dtype=torch.long) * 7919 + seed
    counter = torch.zeros(trials, dtype=torch.long)
    batch_parents = torch.tensor(parents).expand(trials, -1)

    def step(root_tokens, position, counter):
        tokens, target_probs, draft_probs = draw_tree(model, parents, root_tokens, position, seeds, counter, children)
        return verify_sampling(tokens, batch_parents, target_probs, draft_probs, seeds, counter, max_depth, rule)

    accept_len, _, out_tokens = step(torch.full((trials,), ROOT), 0, counter)
    first = out_tokens[:, 0]
    _, _, next_out = step(first, 1, counter + 1)
    second = torch.where(accept_len >= 1, out_tokens[:, 1], next_out[:, 0])
    return torch.stack([first, second], 1)


def stream_verdicts(model: ToyModel, tokens: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Chi-square (statistic, threshold) of the first tokens and of the first pairs."""
    vocab = model.vocab
    first = chi_square(counts(tokens[:, 0], vocab), model.target[0, ROOT].double().numpy())
    pairs = chi_square(counts(tokens[:, 0] * vocab + tokens[:, 1], vocab * vocab), model.pair_probs())
    return {"first token": first[:2], "first pair": pairs[:2]}


def assert_stream_is_the_targets(model: ToyModel, tokens: torch.Tensor) -> None:
    for name, (statistic, threshold) in stream_verdicts(model, tokens).items():
        assert statistic < threshold, f"{name}: chi-square {statistic:.1f} >= threshold {threshold:.1f}"


def stream_is_rejected(model: ToyModel, tokens: torch.Tensor) -> bool:
    return any(statistic >= threshold for statistic, threshold in stream_verdicts(model, tokens).values())


@st.composite
def trees(draw, max_nodes: int, max_children: int) -> list[int]:
    """A random tree as parents (node i's parent drawn among earlier nodes with room for a child)."""
    n = draw(st.integers(2, max_nodes))
    parents = [-1]
    for i in range(1, n):
        open_nodes = [v for v in range(i) if parents.count(v) < max_children]
        parents.append(draw(st.sampled_from(open_nodes)))
    return parents


TRIALS = 20_000
VOCAB = 5
# A fixed tree for the parametrised tests: the root has 3 children, depth 3, 9 nodes.
TREE = [-1, 0, 0, 0, 1, 1, 2, 4, 4]
TREE_DEPTH = 3


# --------------------------------------------------------------------------------------------
# The emitted stream is the target's.
# --------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    parents=trees(max_nodes=10, max_children=3),
    model_seed=st.integers(0, 2**16),
    depth_cut=st.integers(0, 1),
    temperature=st.sampled_from([1.0, 0.5, 1.5]),
    top_k=st.sampled_from([0, 2, 3]),
    top_p=st.sampled_from([1.0, 0.6, 0.85]),
)
def test_rrs_stream_is_the_targets_on_random_trees(parents, model_seed, depth_cut, temperature, top_k, top_p):
    depth = max(node_depths(parents))
    max_depth = max(1, depth - depth_cut)
    # step 2 (rooted at position 1) reads the distributions after its deepest node, at 1 + depth
    model = toy_model(model_seed, VOCAB, depth + 2, temperature, top_k, top_p)
    tokens = first_two_tokens(model, parents, max_depth, TRIALS, seed=model_seed)
    assert_stream_is_the_targets(model, tokens)


SHAPINGS = {
    "temperature": dict(temperature=0.6),
    "hot temperature": dict(temperature=1.8),
    # the root has 3 children but only 2 draft tokens are possible: the third is a draw past q's
    # support (key -inf), which the rule must never accept
    "top-k": dict(top_k=2),
    "top-p": dict(top_p=0.7),
    "all three": dict(temperature=0.8, top_k=4, top_p=0.8),
}


@pytest.mark.parametrize("shaping", SHAPINGS.values(), ids=SHAPINGS.keys())
def test_rrs_stream_is_the_shaped_targets(shaping):
    model = toy_model(11, VOCAB, positions=TREE_DEPTH + 2, **shaping)
    tokens = first_two_tokens(model, TREE, TREE_DEPTH, TRIALS, seed=3)
    assert_stream_is_the_targets(model, tokens)


@pytest.mark.parametrize("children", ["sampled", "ranked"])
def test_q_one_stream_is_the_targets_for_sampled_and_ranked_children(children):
    model = toy_model(12, VOCAB, positions=TREE_DEPTH + 2, top_p=0.9)
    tokens = first_two_tokens(model, TREE, TREE_DEPTH, TRIALS, seed=4, rule="q_one", children=children)
    assert_stream_is_the_targets(model, tokens)


def test_rrs_accepts_more_than_q_one_on_sampled_children():
    # the reason for rrs: sum min(p, q) >= sum p q per draw
    model = toy_model(13, VOCAB, positions=TREE_DEPTH + 2)
    seeds = torch.arange(TRIALS) + 1
    counter = torch.zeros(TRIALS, dtype=torch.long)
    tokens, target_probs, draft_probs = draw_tree(model, TREE, torch.zeros(TRIALS, dtype=torch.long), 0, seeds, counter)
    parents = torch.tensor(TREE).expand(TRIALS, -1)
    mean_accepted = {
        rule: float(verify_sampling(tokens, parents, target_probs, draft_probs, seeds, counter, TREE_DEPTH, rule)[0].float().mean())
        for rule in ("rrs", "q_one")
    }
    assert mean_accepted["rrs"] > mean_accepted["q_one"] + 0.05, mean_accepted


# --------------------------------------------------------------------------------------------
# The test has teeth: wrong rules are caught by the same harness and sample count.
# --------------------------------------------------------------------------------------------


def _wrong_q_as_one(r, x, u):
    # accept with probability p(x), as if q(x) were 1, although x was drawn from q; keep the
    # recursive residual p <- norm(max(0, p - q)) (the mix-up the issue warns about)
    _, rejected = vs._try_child_rrs(r, x, u)
    return u < r.p_weights.gather(1, x[:, None])[:, 0] / r.p_mass, rejected


def _wrong_no_residual(r, x, u):
    # accept with min(1, p(x)/q(x)) but keep p after a rejection (skip the residual update)
    accepted, rejected = vs._try_child_rrs(r, x, u)
    return accepted, rejected._replace(p_weights=r.p_weights, p_mass=r.p_mass)


def _wrong_q_not_updated(r, x, u):
    # the residual update of p, but q keeps the rejected token (the next child is not drawn from it)
    accepted, rejected = vs._try_child_rrs(r, x, u)
    return accepted, rejected._replace(q_weights=r.q_weights, q_mass=r.q_mass)


WRONG_RULES: dict[str, Callable] = {
    "q treated as 1 with the recursive residual": _wrong_q_as_one,
    "no residual update": _wrong_no_residual,
    "q not updated after a rejection": _wrong_q_not_updated,
}


@pytest.mark.parametrize("wrong_rule", WRONG_RULES.values(), ids=WRONG_RULES.keys())
def test_wrong_rules_are_caught(monkeypatch, wrong_rule):
    model = toy_model(11, VOCAB, positions=TREE_DEPTH + 2)
    # the right rule passes on this very configuration ...
    assert not stream_is_rejected(model, first_two_tokens(model, TREE, TREE_DEPTH, TRIALS, seed=5))
    # ... and the wrong one is rejected with the same samples' count
    monkeypatch.setitem(vs._TRY_CHILD, "rrs", wrong_rule)
    assert stream_is_rejected(model, first_two_tokens(model, TREE, TREE_DEPTH, TRIALS, seed=5))


def test_rrs_on_ranked_children_is_caught():
    # rrs is exact only for children drawn from q: on a static tree of draft ranks (top-k
    # children) it is biased, and the harness sees it; q_one is the rule there
    model = toy_model(11, VOCAB, positions=TREE_DEPTH + 2)
    tokens = first_two_tokens(model, TREE, TREE_DEPTH, TRIALS, seed=6, children="ranked")
    assert stream_is_rejected(model, tokens)


# --------------------------------------------------------------------------------------------
# Limits, determinism, the op's contract.
# --------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_verification():
    # one-hot p and q: q_one accepts a child iff it is the target's argmax, as verify_greedy
    # does; rrs tries the draft's argmax only and emits the target's argmax either way
    trials, n = 64, len(TREE)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(trials, n, VOCAB, generator=gen)
    target_probs = shape_logits(logits, 0.0)
    draft_probs = shape_logits(logits + 0.8 * torch.randn(trials, n, VOCAB, generator=gen), 0.0)
    tokens = torch.randint(0, VOCAB, (trials, n), generator=gen)
    parents = torch.tensor(TREE).expand(trials, -1)
    seeds, counter = torch.arange(trials), torch.zeros(trials, dtype=torch.long)
    greedy = torch.ops.specc.verify_greedy(tokens, parents, target_probs.argmax(-1), TREE_DEPTH)
    q_one = verify_sampling(tokens, parents, target_probs, draft_probs, seeds, counter, TREE_DEPTH, "q_one")
    for got, want in zip(q_one, greedy):
        assert torch.equal(got, want)
    rrs = verify_sampling(tokens, parents, target_probs, draft_probs, seeds, counter, TREE_DEPTH, "rrs")
    assert torch.equal(rrs[2][:, 0], greedy[2][:, 0])


def _random_case(batch: int, n: int, vocab: int, max_children: int, seed: int):
    """Random trees (one per sequence), rows with exact zeros, children drawn from the draft."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.full((batch, n), -1, dtype=torch.long)
    for i in range(1, n):
        parents[:, i] = torch.randint(0, i, (batch,), generator=gen)
    # peaked rows (so that children get accepted even over hundreds of tokens), each with exact
    # zeros (top-k), the draft's a perturbation of the target's
    logits = 3.0 * torch.randn(batch, n, vocab, generator=gen)
    target_probs = shape_logits(logits, top_k=max(2, vocab // 2))
    draft_probs = shape_logits(logits + 1.5 * torch.randn(batch, n, vocab, generator=gen), top_k=max(2, vocab * 2 // 3))
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    counter = torch.randint(0, 2**40, (batch,), generator=gen)
    tokens = torch.full((batch, n), -1, dtype=torch.long)
    tokens[:, 0] = 0
    drawn, _ = gumbel_top_k(draft_probs.log(), min(vocab, max_children), seeds, counter)  # [B, N, k]
    for i in range(1, n):
        # node i is the r-th child of its parent: it carries the parent's r-th draw, or padding
        rank = (parents[:, 1:i] == parents[:, i : i + 1]).sum(1)
        ok = rank < drawn.shape[-1]
        token = drawn[torch.arange(batch), parents[:, i]].gather(1, rank.clamp(max=drawn.shape[-1] - 1)[:, None])[:, 0]
        tokens[:, i] = torch.where(ok, token, -1)
    return tokens, parents, target_probs, draft_probs, seeds, counter


@pytest.mark.parametrize("rule", ["rrs", "q_one"])
def test_same_seed_same_tokens_at_any_batch_position(rule):
    case = _random_case(batch=24, n=12, vocab=7, max_children=3, seed=2)
    whole = verify_sampling(*case, 4, rule)
    for got, want in zip(verify_sampling(*case, 4, rule), whole):
        assert torch.equal(got, want)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    permuted = verify_sampling(*(t[order] for t in case), 4, rule)
    for got, want in zip(permuted, whole):
        assert torch.equal(got, want[order])
    for b in (0, 5, 23):
        alone = verify_sampling(*(t[b : b + 1] for t in case), 4, rule)
        for got, want in zip(alone, whole):
            assert torch.equal(got, want[b : b + 1])
    tokens, parents, target_probs, draft_probs, seeds, counter = case
    reseeded = verify_sampling(tokens, parents, target_probs, draft_probs, seeds + 1, counter, 4, rule)
    assert not torch.equal(reseeded[2], whole[2])


@pytest.mark.parametrize("rule", ["rrs", "q_one"])
def test_outputs_follow_the_greedy_ops_conventions(rule):
    tokens, parents, target_probs, draft_probs, seeds, counter = case = _random_case(64, 12, 7, 3, seed=3)
    max_depth = 3
    accept_len, path, out_tokens = verify_sampling(*case, max_depth, rule)
    assert accept_len.dtype == path.dtype == out_tokens.dtype == torch.long
    assert path.shape == out_tokens.shape == (64, max_depth + 1)
    assert (accept_len >= 0).all() and (accept_len <= max_depth).all()
    for b in range(64):
        a = int(accept_len[b])
        assert path[b, 0] == 0 and (path[b, a + 1 :] == 0).all() and (out_tokens[b, a + 1 :] == -1).all()
        for d in range(1, a + 1):
            node = int(path[b, d])
            assert parents[b, node] == path[b, d - 1]
            assert out_tokens[b, d - 1] == tokens[b, node]
        assert target_probs[b, path[b, a], out_tokens[b, a]] > 0, "a token the target cannot emit"
    assert (accept_len > 0).any() and (accept_len == 0).any()


def test_op_registration_and_fake():
    case = _random_case(4, 6, 5, 2, seed=4)
    torch.library.opcheck(
        verify_sampling.default, (*case, 2, "rrs"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    with pytest.raises(ValueError, match="max_depth=6"):
        verify_sampling(*case, 6)
    with pytest.raises(ValueError, match="rule='q'"):
        verify_sampling(*case, 2, "q")
    tokens, parents, target_probs, draft_probs, seeds, counter = case
    with pytest.raises(ValueError, match="one shape"):
        verify_sampling(tokens, parents, target_probs, draft_probs[:, :, :4], seeds, counter, 2)


# --------------------------------------------------------------------------------------------
# The generated kernel equals the reference (Triton interpreter; tests/lowering/interpreter.py).
# --------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # batch, nodes, vocab, block_v, max_depth, rule, max_children
    (24, 9, 37, 16, 3, "rrs", 3),
    (24, 12, 7, 8, 5, "rrs", 2),
    (16, 9, 37, 64, 2, "q_one", 3),
    (8, 5, 16, 16, 4, "rrs", 1),
    (12, 17, 300, 64, 6, "rrs", 4),
    (12, 17, 300, 128, 6, "q_one", 4),
]


@interpreted
def test_kernel_matches_reference_in_the_interpreter():
    """Every case, kernel outputs written into poisoned buffers."""
    from specc.lowering.verify_sampling_triton import kernel_source, verify_sampling_triton

    for i, (batch, n, vocab, block_v, max_depth, rule, max_children) in enumerate(KERNEL_CASES):
        case = _random_case(batch, n, vocab, max_children, seed=100 + i)
        want = vs.verify_sampling_reference(*case, max_depth, rule)
        out = (
            torch.full((batch,), 12345, dtype=torch.long),
            torch.full((batch, max_depth + 1), 12345, dtype=torch.long),
            torch.full((batch, max_depth + 1), 12345, dtype=torch.long),
        )
        workspace = torch.full((batch, 3, vocab), float("nan"))
        tokens, parents, target_probs, draft_probs, seeds, counter = case
        got = verify_sampling_triton(
            tokens, parents.int(), target_probs, draft_probs, seeds, counter, max_depth, rule,
            block_v=block_v, out=out, workspace=workspace,
        )
        for name, g, w in zip(("accept_len", "path", "out_tokens"), got, want):
            assert torch.equal(g, w), f"case {KERNEL_CASES[i]}: {name}\nkernel    {g.tolist()}\nreference {w.tolist()}"
        assert want[0].sum() > 0, "the case accepts nothing: it would not test the descent"
        source = kernel_source(n_nodes=n, vocab=vocab, max_depth=max_depth, block_v=block_v, rule=rule)
        assert source == kernel_source(n_nodes=n, vocab=vocab, max_depth=max_depth, block_v=block_v, rule=rule)


GPU_CASES = KERNEL_CASES + [
    # SmolLM2's vocabulary, the default "eagle" tree's size and depth, and a 64-node dynamic tree
    (4, 25, 49152, 1024, 5, "rrs", 4),
    (4, 25, 49152, 1024, 5, "q_one", 4),
    (2, 64, 49152, 1024, 8, "q_one", 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case_index", range(len(GPU_CASES)))
def test_kernel_equals_reference_on_gpu(case_index):
    """The custom op on CUDA (the generated kernel) against the CPU reference, bit for bit: the
    same Philox stream and the same float order of the residual updates."""
    batch, n, vocab, _, max_depth, rule, max_children = GPU_CASES[case_index]
    case = _random_case(batch, n, vocab, max_children, seed=300 + case_index)
    want = vs.verify_sampling_reference(*case, max_depth, rule)
    tokens, parents, target_probs, draft_probs, seeds, counter = (t.cuda() for t in case)
    got = torch.ops.specc.verify_sampling(tokens, parents, target_probs, draft_probs, seeds, counter, max_depth, rule)
    for name, g, w in zip(("accept_len", "path", "out_tokens"), got, want):
        assert torch.equal(g.cpu(), w), f"case {GPU_CASES[case_index]}: {name}\nkernel    {g.tolist()}\nreference {w.tolist()}"
