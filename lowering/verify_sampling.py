"""specc::verify_sampling — lossless speculative sampling over a draft tree.

The target has scored every tree node in one forward: p_i = target_probs[b, i] is its (shaped)
distribution of the token after node i, and q_i = draft_probs[b, i] is the (identically shaped)
draft distribution that node i's children were drawn from. The op walks down from the root and
emits accept_len accepted draft tokens plus one token drawn from the target (the correction after
a rejection, or the bonus after a leaf or at max_depth). Lossless: each emitted token, given all
tokens before it, is distributed as p given those tokens, so the stream that decode steps emit
is distributed exactly as sampling the (shaped) target one token at a time.

rule="rrs" — recursive rejection sampling (Jeon et al., arXiv:2402.14160), the default.
  At the current node, with residuals p (target) and q (draft), initially p_i and q_i, try the
  children x_1, x_2, ... in index order:
      accept x with probability min(1, p(x) / q(x));
      on rejection:  p <- norm(max(0, p - q)),  q <- norm(q with x removed),  try the next child.
  An accepted child becomes the current node (p, q <- its p_j, q_j). When no child is accepted
  (or the node is a leaf, or max_depth is reached) the last token is drawn from the residual p.
  Exact when, under every node, the children in index order are successive draws without
  replacement from q_i (Gumbel-top-k, sampling.gumbel_top_k), and the number kept is a stopping
  time of that draw sequence: whether draw m + 1 is kept may depend on draws 1..m and on
  anything independent of this node's draws (the node's own path, other branches' noise, a
  fixed tree shape), but not on draw m + 1 itself, later draws, or what was drawn below them.
  A static tree shape sampled by Gumbel-top-k qualifies; keeping children because of their own
  draft probabilities (EAGLE-2's reranking) does not. Why it is exact: given draws 1..m, draw
  m + 1 is distributed as q with them removed, which is the q the rule holds; accepting x ~ q
  with probability min(1, p(x)/q(x)) emits x with probability min(p(x), q(x)) and leaves the
  mass max(0, p - q) for the rejection branch, which does not depend on x; so by induction over
  the children the rejection branch emits norm(max(0, p - q)) and the node emits p.
  A child with q(x) = 0 at its turn (a draw past q's support, or a repeated token) cannot have
  been drawn from q: it is never accepted and changes nothing.

rule="q_one" — the rule of EAGLE / SGLang / vLLM tree sampling, "the draft's probability is 1".
  Try the children in index order: accept x with probability p(x); on rejection
  p <- norm(p with x removed). draft_probs is not read.
  Exact for ANY choice of children, sampled or deterministic (draft top-k, EAGLE-2 reranking, a
  static tree of draft ranks, repeated tokens), as long as the tree does not depend on this op's
  random numbers: given the children, it is sequential sampling from p that checks the
  candidates first (each candidate x is emitted with probability p(x), the rest of p when all
  are rejected). It accepts less than rrs when children are drawn from q (a first child is
  accepted with probability sum p q <= sum min(p, q)), but it is the rule for trees whose
  children are chosen deterministically, where rrs is NOT exact.

Arithmetic: exact in real numbers; in floats, the accept coins have 23-bit resolution (each
decision's probability is off by < 2**-23), the residuals are float32 and the final token's
inverse CDF is float64.

Random numbers: node j's coin is uniform(seed[b], counter[b], j, STREAM_VERIFY) (float32) and the
final token's is index 0 of the same stream in float64, for an inverse CDF taken in float64
(sampling.py): a function of (seed, counter) alone, so the same request gives the same tokens at
any batch position. The runtime advances counter each step.

Inputs, per sequence b of B, for a tree of N nodes over a vocabulary of V:
  tree_tokens   int [B, N]       token at each node (node 0: the last accepted token; a negative
                                 token marks a padding node, never accepted)
  parents       int [B, N]       parents[b, 0] = -1, parents[b, i] < i (lowering/tree.py)
  target_probs  float [B, N, V]  p_i (sampling.shape_logits of the target's logits at node i)
  draft_probs   float [B, N, V]  q_i (sampling.shape_logits of the draft's logits at node i;
                                 a leaf's row is never used)
                                 Rows are distributions (sum 1 up to rounding) and are used as
                                 given; only the residuals are renormalised.
  seed, counter int64 [B]
  max_depth     int              nodes deeper than it are never accepted
  rule          str              "rrs" or "q_one" (above)
Outputs, the greedy op's conventions, with a = accept_len[b] in 0..max_depth:
  accept_len  int64 [B]
  path        int64 [B, max_depth + 1]  path[b, 0] = 0, path[b, 1..a] the accepted nodes, rest 0
  out_tokens  int64 [B, max_depth + 1]  out_tokens[b, :a] the accepted tokens, out_tokens[b, a]
                                        the correction or bonus token, the rest -1
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specc.lowering.registry import kernel_enabled
from specc.lowering.sampling import STREAM_VERIFY, sample_from, uniform

RULES = ("rrs", "q_one")


class Residuals(NamedTuple):
    """The residual distributions at the current node, as weights and masses:
    p = p_weights / p_mass and q = q_weights / q_mass, weights [B, V], masses [B] (float32).

    Keeping masses beside unnormalised weights (rather than renormalising the rows) makes a
    removal O(1) (zero one weight, subtract it from the mass) and is exactly what the kernel
    stores, so that the two perform the same float operations and agree bit for bit. A node's
    own rows enter with mass 1 (they are distributions).
    """

    p_weights: torch.Tensor
    p_mass: torch.Tensor
    q_weights: torch.Tensor
    q_mass: torch.Tensor

    @staticmethod
    def of_node(target_probs: torch.Tensor, draft_probs: torch.Tensor, node: int) -> Residuals:
        p, q = target_probs[:, node].float(), draft_probs[:, node].float()
        one = torch.ones(p.shape[0], dtype=torch.float32, device=p.device)
        return Residuals(p, one, q, one)

    def where(self, condition: torch.Tensor, other: Residuals) -> Residuals:
        """Per sequence: self where condition [B], else other."""
        return Residuals(*(
            torch.where(condition.reshape(-1, *([1] * (mine.dim() - 1))), mine, theirs)
            for mine, theirs in zip(self, other)
        ))


def _remove(weights: torch.Tensor, mass: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution with token x removed and renormalised: weight 0, mass less its weight."""
    return weights.scatter(1, x[:, None], 0.0), mass - weights.gather(1, x[:, None])[:, 0]


def _try_child_rrs(r: Residuals, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, Residuals]:
    """Recursive rejection sampling at one child x [B] with coin u [B]:
    (accepted [B], the residuals after a rejection)."""
    p_x = r.p_weights.gather(1, x[:, None])[:, 0] / r.p_mass
    q_x = torch.where(r.q_mass > 0, r.q_weights.gather(1, x[:, None])[:, 0] / r.q_mass, 0.0)
    drawable = q_x > 0  # q(x) = 0: x cannot have been drawn from q; never accepted, no update
    accepted = drawable & (u * q_x < p_x)  # u < p(x) / q(x): probability min(1, p(x) / q(x))
    # p <- norm(max(0, p - q)); the mass is summed in float64 so that the kernel's tiled sum
    # rounds to the same float32. No residual mass means p == q, where a rejection has
    # probability 0 (up to rounding): p is kept then.
    residual = (r.p_weights / r.p_mass[:, None] - r.q_weights / r.q_mass[:, None]).clamp_min(0.0)
    residual_mass = residual.double().sum(1).float()
    has_mass = residual_mass > 0
    p_weights = torch.where(has_mass[:, None], residual, r.p_weights)
    p_mass = torch.where(has_mass, residual_mass, r.p_mass)
    # q <- norm(q without x)
    q_weights, q_mass = _remove(r.q_weights, r.q_mass, x)
    return accepted, Residuals(p_weights, p_mass, q_weights, q_mass).where(drawable, r)


def _try_child_q_one(r: Residuals, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, Residuals]:
    """The q = 1 rule at one child x [B] with coin u [B]: (accepted [B], the residuals after a rejection)."""
    accepted = u < r.p_weights.gather(1, x[:, None])[:, 0] / r.p_mass  # probability p(x)
    # p <- norm(p without x), kept when x held all of p's mass (then it is never rejected)
    p_weights, p_mass = _remove(r.p_weights, r.p_mass, x)
    rejected = Residuals(p_weights, p_mass, r.q_weights, r.q_mass)
    return accepted, rejected.where(p_mass > 0, r)


# rule name -> the test and update at one child (looked up at call time, so tests can swap in
# a deliberately wrong rule and watch the statistical tests fail).
_TRY_CHILD = {"rrs": _try_child_rrs, "q_one": _try_child_q_one}


def verify_sampling_reference(
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    max_depth: int,
    rule: str = "rrs",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the nodes in index order: fixed shapes, no host sync, traceable.

    A node's children all have larger indices than the node, and a node's later siblings are
    never tried once it is accepted, so visiting j = 1..N-1 once and trying j when its parent is
    the current node (and the path is shorter than max_depth) tries exactly the children of each
    node on the path, in index order.
    """
    try_child = _TRY_CHILD[rule]
    batch, n, vocab = target_probs.shape
    device = target_probs.device
    tree_tokens, parents = tree_tokens.long(), parents.long()
    slots = torch.arange(max_depth + 1, device=device)
    coins = uniform(seed, counter, torch.arange(n, device=device)[None, :], STREAM_VERIFY)  # [B, N]

    residuals = Residuals.of_node(target_probs, draft_probs, 0)
    current = torch.zeros(batch, dtype=torch.long, device=device)
    accept_len = torch.zeros(batch, dtype=torch.long, device=device)
    path = torch.zeros(batch, max_depth + 1, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=device)
    for j in range(1, n):
        token = tree_tokens[:, j]
        tried = (parents[:, j] == current) & (accept_len < max_depth) & (token >= 0) & (token < vocab)
        accepted, after_rejection = try_child(residuals, token.clamp(0, vocab - 1), coins[:, j])
        accepted = tried & accepted
        residuals = after_rejection.where(tried & ~accepted, residuals)
        # Descend into an accepted child: it takes the next slot of the path, its rows the residuals.
        path = torch.where(accepted[:, None] & (slots == accept_len[:, None] + 1), j, path)
        out_tokens = torch.where(accepted[:, None] & (slots == accept_len[:, None]), token[:, None], out_tokens)
        residuals = Residuals.of_node(target_probs, draft_probs, j).where(accepted, residuals)
        current = torch.where(accepted, j, current)
        accept_len = accept_len + accepted.long()
    last_coin = uniform(seed, counter, torch.zeros(1, 1, dtype=torch.long, device=device), STREAM_VERIFY, torch.float64)
    last = sample_from(residuals.p_weights, last_coin[:, 0], residuals.p_mass)
    out_tokens = torch.where(slots[None, :] == accept_len[:, None], last[:, None], out_tokens)
    return accept_len, path, out_tokens


def _check(tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule) -> None:
    if target_probs.dim() != 3 or draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"verify_sampling needs target_probs and draft_probs of one shape [B, N, V]; got "
            f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}"
        )
    batch, n, _ = target_probs.shape
    if tree_tokens.shape != (batch, n) or parents.shape != (batch, n):
        raise ValueError(
            f"verify_sampling needs tree_tokens and parents of shape [B, N] = [{batch}, {n}]; got "
            f"{tuple(tree_tokens.shape)} and {tuple(parents.shape)}"
        )
    if seed.shape != (batch,) or counter.shape != (batch,):
        raise ValueError(
            f"verify_sampling needs seed and counter of shape [B] = [{batch}]; got {tuple(seed.shape)} and "
            f"{tuple(counter.shape)}"
        )
    if not 0 <= max_depth < n:
        raise ValueError(f"max_depth={max_depth} for a tree of {n} nodes; pass the tree's depth (0 <= max_depth < N)")
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")


@torch.library.custom_op("specc::verify_sampling", mutates_args=())
def verify_sampling(
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    max_depth: int,
    rule: str = "rrs",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule)
    if target_probs.is_cuda and kernel_enabled():
        from specc.lowering.verify_sampling_triton import verify_sampling_triton

        return verify_sampling_triton(
            tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule
        )
    return verify_sampling_reference(tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule)


@verify_sampling.register_fake
def _(tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule="rrs"):
    _check(tree_tokens, parents, target_probs, draft_probs, seed, counter, max_depth, rule)
    batch = tree_tokens.shape[0]
    return (
        tree_tokens.new_empty((batch,), dtype=torch.long),
        tree_tokens.new_empty((batch, max_depth + 1), dtype=torch.long),
        tree_tokens.new_empty((batch, max_depth + 1), dtype=torch.long),
    )
