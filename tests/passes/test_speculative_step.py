"""Speculative decoding is lossless: greedy output equals plain greedy, for random tiny Llamas,
random draft heads (both EAGLE kinds), random static trees of 1 to 64 nodes and batches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.draft.tree_tuning import CHAT_TUNED_TREES, tuned_tree
from specc.lowering.tree import static_tree
from specc.models.llama import LlamaConfig
from specc.passes.speculative_step import DynamicTree, TreePlan
from tests.models_factory import hf_llama, reference_llama
from tests.oracle_draft import OracleDraft
from tests.strategies import llama_configs, prompts, seeded_weights, tree_parents

SMALL = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def _random_draft(target, config, kind, seed):
    return seeded_weights(EagleDraft(DraftConfig.for_target(config, kind)), seed).attach_to(target).eval()


@st.composite
def dynamic_trees(draw):
    top_k = draw(st.integers(1, 4))
    depth = draw(st.integers(1, 4))
    most = min(64, top_k + (depth - 1) * top_k**2 + 1)
    return DynamicTree(top_k, depth, draw(st.integers(2, max(2, most))))


@settings(max_examples=12)
@given(config=llama_configs(max_layers=2), kind=st.sampled_from(["eagle", "eagle3"]),
       parents=st.one_of(tree_parents(1, 24), dynamic_trees()), seed=st.integers(0, 2**16), data=st.data())
def test_spec_greedy_equals_plain_greedy(config, kind, parents, seed, data):
    torch._dynamo.reset()
    target = reference_llama(config, seed)
    batch_prompts = data.draw(prompts(config.vocab_size, max_batch=3, max_len=8))
    new = data.draw(st.integers(1, 12))
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=new, compile=False)
    draft = _random_draft(target, config, kind, seed + 1)
    # half the time the draft proposes from a draft vocabulary (a random subset, at least the
    # largest number of children a node has)
    if data.draw(st.booleans()):
        widest = parents.top_k if isinstance(parents, DynamicTree) else max(map(parents.count, range(len(parents))))
        size = data.draw(st.integers(max(1, widest), config.vocab_size))
        draft.set_draft_vocab(torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))[:size].sort().values)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=parents)),
                          batch_prompts, max_new_tokens=new, compile=False)
    assert spec.tokens == plain.tokens


@pytest.mark.parametrize("tree", ["chain:6", "eagle", [-1] + [0] * 63], ids=["chain", "eagle", "star64"])
def test_spec_greedy_equals_plain_on_hf_model_with_named_trees(tree):
    target = hf_llama(SMALL, seed=11)
    batch_prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=16, compile=False)
    draft = _random_draft(target, SMALL, "eagle", 5)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=tree)),
                          batch_prompts, max_new_tokens=16, compile=False)
    assert spec.tokens == plain.tokens


def test_the_catch_up_mask_made_once_drafts_as_the_one_built_every_step(monkeypatch):
    """The draft's catch-up forward takes a causal mask made once per step function (the
    default); scripts/step_variants.py's "before" builds it inside every step. Every draft
    forward of a decode must give the same output either way (a wrong draft mask would keep
    greedy output equal to plain, and only lower acceptance: so the forwards are compared)."""
    from specc.passes import speculative_step

    target = hf_llama(SMALL, seed=12)
    draft = _random_draft(target, SMALL, "eagle3", 7)
    batch_prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=16, compile=False)
    real_decoder = speculative_step.decoder
    outputs = {}
    for constant in (True, False):
        monkeypatch.setattr(speculative_step, "CONSTANT_CATCH_UP_MASK", constant)
        seen = outputs[constant] = []

        def recording_decoder(d, stacked=None, seen=seen):
            decode = real_decoder(d, stacked)

            def recorded(*args, **kwargs):
                seen.append(decode(*args, **kwargs))
                return seen[-1]
            return recorded

        monkeypatch.setattr(speculative_step, "decoder", recording_decoder)
        torch._dynamo.reset()
        spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree="eagle")),
                              batch_prompts, max_new_tokens=16, compile=False)
        assert spec.tokens == plain.tokens
    assert len(outputs[True]) == len(outputs[False]) > 0
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))


@pytest.mark.parametrize("tree", [static_tree("chain", depth=5), static_tree("eagle"), static_tree("full", depth=3, branching=3),
                                  [-1, 0, 1, 2, 0, 4, 1, 0],
                                  DynamicTree(top_k=4, depth=5, size=24), DynamicTree(top_k=8, depth=8, size=64),
                                  tuned_tree(128, 6, CHAT_TUNED_TREES), tuned_tree(64, 4, CHAT_TUNED_TREES)],
                         ids=["chain5", "eagle", "full3x3", "numbered-depth-first", "dynamic4x5", "dynamic8x8", "chat128x6",
                              "chat64x4"])
def test_oracle_draft_accepts_a_full_path_every_step(tree):
    target = reference_llama(SMALL, seed=2)
    batch_prompts = [[7, 7, 1], [2, 4, 8, 16, 32]]
    new = 25
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=new + 12, compile=False)
    sequences = [p + t for p, t in zip(batch_prompts, plain.tokens)]
    oracle = OracleDraft(sequences, SMALL.vocab_size, SMALL.hidden_size)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=oracle, tree=tree)),
                          batch_prompts, max_new_tokens=new, compile=False)
    assert spec.tokens == [t[:new] for t in plain.tokens]
    depth = tree.depth if isinstance(tree, DynamicTree) else TreePlan.from_parents(tree).max_depth
    # after the prefill's token, every step emits depth + 1 tokens until the budget runs out
    assert spec.steps == len(batch_prompts) * math.ceil((new - 1) / (depth + 1))


def test_a_tree_per_batch_size_drafts_with_each_batchs_own_tree_and_stays_lossless():
    """tree={1: chain of 5, 2: chain of 2, 3: plain}: with the oracle draft each batch size's steps
    show its own tree's depth (or none), and every output equals plain greedy; 4 sequences, past
    the largest key, decode plainly too."""
    target = reference_llama(SMALL, seed=2)
    every = [[7, 7, 1], [2, 4, 8, 16, 32], [5, 9], [3, 3, 3, 3]]
    new = 13
    plain = specc.generate(torch.compile(target, backend=specc.backend()), every, max_new_tokens=new + 12, compile=False)
    oracle = OracleDraft([p + t for p, t in zip(every, plain.tokens)], SMALL.vocab_size, SMALL.hidden_size)
    compiled = torch.compile(target, backend=specc.backend(draft=oracle, tree={1: "chain:5", 2: "chain:2", 3: "plain"}))
    for batch, depth in ((1, 5), (2, 2), (3, 0), (4, 0)):
        out = specc.generate(compiled, every[:batch], max_new_tokens=new, compile=False)
        assert out.tokens == [t[:new] for t in plain.tokens[:batch]], batch
        assert out.steps == batch * math.ceil((new - 1) / (depth + 1)), batch
        assert out.mean_accept_length == depth + 1, batch  # 12 tokens after the prefill's: whole paths only


@pytest.mark.parametrize("tree, message", [
    ({}, "no entries"),
    ({0: "eagle"}, "key 0 is not a batch size"),
    ({"8": "eagle"}, "key '8' is not a batch size"),
    ({1: "eagle", 8: "bogus"}, "entry 8: 'bogus' is not a tree"),
    ({1: None}, "entry 1: None; give a tree"),
])
def test_a_malformed_tree_per_batch_size_is_refused_when_the_backend_is_made(tree, message):
    with pytest.raises(ValueError, match=message):
        specc.backend(tree=tree)


@pytest.mark.slow
def test_compiled_spec_step_equals_plain_through_inductor():
    target = reference_llama(SMALL, seed=4)
    batch_prompts = [[11, 12, 13, 14], [1, 2]]
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=10, compile=False)
    draft = _random_draft(target, SMALL, "eagle3", 6)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree="eagle")),
                          batch_prompts, max_new_tokens=10, compile=True)
    assert spec.tokens == plain.tokens


@settings(max_examples=25)
@given(batch=st.integers(1, 3), k=st.integers(1, 5), levels=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_dynamic_drafts_slot_mask_built_level_by_level_is_the_ancestor_mask(batch, k, levels, seed):
    """_draft_dynamic extends its slot mask one level at a time; the rows must equal the ancestor
    mask of the slots' parent pointers (a slot of level l > 1 has a parent among level l - 1's)."""
    from specc.lowering.tree import ancestor_mask
    from specc.passes.speculative_step import extend_slot_mask

    gen = torch.Generator().manual_seed(seed)
    n_slots = levels * k
    parents = torch.full((batch, n_slots), -1, dtype=torch.int64)
    mask = torch.zeros(batch, n_slots, n_slots, dtype=torch.bool)
    for level in range(levels):
        base = level * k
        parent_slot = torch.full((batch, k), -1, dtype=torch.int64)
        if level:
            parent_slot = base - k + torch.randint(0, k, (batch, k), generator=gen)
        parents[:, base:base + k] = parent_slot
        extend_slot_mask(mask, base, parent_slot)
        used = base + k
        assert torch.equal(mask[:, :used, :used], ancestor_mask(parents[:, :used]))


def test_a_draft_vocabulary_narrower_than_the_tree_is_refused_with_what_to_change():
    target = reference_llama(SMALL, seed=2)
    draft = _random_draft(target, SMALL, "eagle", 3).set_draft_vocab(torch.tensor([4, 7]))
    compiled = torch.compile(target, backend=specc.backend(draft=draft, tree=[-1, 0, 0, 0]))
    with pytest.raises(ValueError, match="proposes from 2 tokens but the tree gives a node 3 children"):
        specc.generate(compiled, [[1, 2, 3]], max_new_tokens=4, compile=False)


@pytest.mark.parametrize("grow", [True, False], ids=["grown_list", "cat_per_level"])
def test_level_numbered_trees_draft_over_the_nodes_down_to_each_level_and_get_the_same_tree(monkeypatch, grow):
    """A tree numbered level by level drafts level d over nodes 1 .. (nodes down to level d);
    any other numbering runs every node each level. Both must draft the same tokens: each
    node's feature is its parent's output either way, and its ancestors' K/V the same. Both
    ways of listing a level-ordered tree's tokens (grown by a level per forward, the default;
    all levels concatenated afresh, scripts/step_variants.py's "before") draft the same."""
    from specc.passes import speculative_step
    from specc.passes.speculative_step import StaticTreeConstants, _draft_static, decoder

    monkeypatch.setattr(speculative_step, "GROW_TOKEN_LIST", grow)

    target = reference_llama(SMALL, seed=4)
    draft = _random_draft(target, SMALL, "eagle3", 6)
    plan = TreePlan.from_parents(static_tree("eagle"))
    assert plan.level_ordered and not TreePlan.from_parents([-1, 0, 1, 0]).level_ordered
    constants = StaticTreeConstants.build(plan, "cpu")
    gen = torch.Generator().manual_seed(0)
    batch, context = 2, 9
    root_token = torch.tensor([5, 17])
    root_hidden = torch.randn(batch, SMALL.hidden_size, generator=gen)
    cache_len = torch.tensor([context, context - 3])
    draft_k, draft_v = (torch.randn(1, batch, SMALL.num_key_value_heads, 64, SMALL.head_dim, generator=gen) for _ in range(2))
    calls = []

    def node_by_node():
        # the definition: a node's token is the rank-th best of its parent's draft logits, and
        # its feature the parent's draft output, with every node re-run after each level
        tokens = torch.zeros(batch, plan.size, dtype=torch.int64)
        tokens[:, 0] = root_token
        node_hidden = torch.zeros(batch, plan.size, SMALL.hidden_size)
        node_hidden[:, 0] = root_hidden
        parents, depth = torch.tensor(plan.parents), torch.tensor(plan.depth)
        mask = plan.ancestor_mask()[1:, 1:].expand(batch, plan.size - 1, plan.size - 1)
        cache = (draft_k.clone(), draft_v.clone())
        with torch.no_grad():
            for level in range(1, plan.max_depth + 1):
                for node in plan.levels[level]:
                    ranked = draft.proposal_logits(node_hidden[:, plan.parents[node]]).sort(dim=-1, descending=True, stable=True)[1]
                    tokens[:, node] = draft.proposal_tokens(ranked[:, plan.rank[node]])
                node_hidden[:, 1:] = draft.decode(tokens[:, 1:], node_hidden[:, parents[1:]],
                                                  cache_len[:, None] + depth[None, 1:] - 1, cache_len, mask, *cache)
        return tokens

    def recording_decode(tokens, *args, **kwargs):
        calls.append(tokens.shape[1])
        return draft.decode(tokens, *args, **kwargs)

    def drafted():
        with torch.no_grad():
            return _draft_static(draft, plan, constants, root_token, root_hidden, cache_len, draft_k.clone(),
                                 draft_v.clone(), draft_decode=recording_decode)[0]

    by_level = drafted()
    assert torch.equal(by_level, node_by_node())
    down_to = [sum(len(nodes) for nodes in plan.levels[1:d + 1]) for d in range(1, plan.max_depth)]
    assert calls == down_to and calls[-1] < plan.size - 1
    calls.clear()
    monkeypatch.setattr(TreePlan, "level_ordered", property(lambda self: False))
    every_node = drafted()
    assert calls == [plan.size - 1] * (plan.max_depth - 1)
    assert torch.equal(by_level, every_node)



def test_step_state_written_by_one_op_or_by_copies_decodes_alike(monkeypatch):
    """specc::advance_state (the default) and the copies it replaced (kept for
    scripts/step_variants.py's "statecopies") leave the same state: greedy output equals
    plain's either way, and tokens and per-step accept lengths, greedy and sampled, are equal
    between the two."""
    from specc.passes import speculative_step

    target = reference_llama(SMALL, seed=13)
    draft = _random_draft(target, SMALL, "eagle3", 8)
    batch_prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3]]
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=14, compile=False)
    runs = {}
    for state_op in (True, False):
        monkeypatch.setattr(speculative_step, "ADVANCE_STATE_OP", state_op)
        torch._dynamo.reset()
        compiled = torch.compile(target, backend=specc.backend(draft=draft, tree="eagle"))
        for temperature in (0.0, 0.8):
            out = specc.generate(compiled, batch_prompts, max_new_tokens=14, compile=False,
                                 temperature=temperature, seed=3)
            runs[state_op, temperature] = (out.tokens, out.accept_lengths_by_sequence())
        assert runs[state_op, 0.0][0] == plain.tokens
    assert runs[True, 0.0] == runs[False, 0.0] and runs[True, 0.8] == runs[False, 0.8]
    assert max(max(lengths) for lengths in runs[True, 0.0][1]) > 1  # the tree accepted drafts
