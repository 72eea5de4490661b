"""specc.draft.tree_tuning: ranks break ties as specc::topk does; the frontier rule finds the
best tree; and on a tiny Llama in fp32, real speculative decoding with a static tree accepts,
step for step, exactly what the teacher-forced ranks predict (the premise the tuning rests on)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc
import specc.cli
from specc.draft import tree_tuning
from specc.draft.data import Sequences
from specc.draft.train import TrainConfig, train
from specc.lowering.tree import static_tree, tree_from_paths, validate_parents
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_token_ranks_count_larger_logits_and_equal_ones_at_lower_ids():
    logits = torch.tensor([[0.5, 2.0, 0.5, 1.0, 0.5]])
    ranks = [int(tree_tuning.token_ranks(logits, torch.tensor([t]))) for t in range(5)]
    assert ranks == [2, 0, 3, 1, 4]  # 1.0 > 0.5 = 0.5 = 0.5, ties in id order, as specc::topk
    order = sorted(range(5), key=lambda t: (-float(logits[0, t]), t))
    assert [order.index(t) for t in range(5)] == ranks


def test_path_probabilities_are_the_shares_of_starts_whose_ranks_begin_with_the_path():
    ranks = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 9]])
    p = tree_tuning.path_probabilities(ranks, max_rank=4)
    assert p[(0,)] == 0.75 and p[(1,)] == 0.25 and p[(0, 0)] == 0.5 and p[(0, 0, 1)] == 0.25
    assert (0, 0, 9) not in p  # rank 9 >= max_rank: no tree of ranks < 4 has that node
    chain = tree_tuning.tree_paths(static_tree("chain", depth=3))
    assert chain == [(0,), (0, 0), (0, 0, 0)]
    assert tree_tuning.expected_accept_length(chain, p) == 1 + 0.75 + 0.5 + 0.0


def test_tree_paths_inverts_tree_from_paths():
    for parents in (static_tree("eagle"), static_tree("full", depth=2, branching=3), static_tree("chain", depth=4)):
        assert tree_from_paths(tree_tuning.tree_paths(parents)) == parents


def _closed(paths: set) -> bool:
    return all((p[:-1] in paths or len(p) == 1) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in paths) for p in paths)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_the_frontier_rule_finds_the_best_tree_when_p_falls_along_paths_and_ranks(data):
    # P as the decode's rates make it: a product of per-depth rank rates, falling with the rank
    rates = [sorted(data.draw(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3)), reverse=True)
             for _ in range(3)]
    paths = [p for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    probability = {p: float(torch.tensor([rates[k][r] for k, r in enumerate(p)]).prod()) for p in paths}
    depth = data.draw(st.integers(1, 3))
    candidates = [p for p in paths if len(p) <= depth]
    nodes = data.draw(st.integers(2, min(6, 1 + len(candidates))))
    chosen = tree_tuning.best_tree(probability, nodes, depth)
    validate_parents(tree_from_paths(chosen))
    assert len(chosen) == nodes - 1 and max(map(len, chosen)) <= depth
    best = max(sum(probability[p] for p in subset)
               for subset in itertools.combinations(candidates, nodes - 1)
               if _closed(set(subset)))
    assert tree_tuning.expected_accept_length(chosen, probability) == pytest.approx(1 + best)


def test_best_tree_is_a_valid_tree_whatever_p_is():
    probability = {(1,): 0.9, (0,): 0.1, (1, 0): 0.8, (0, 2): 0.7}  # not monotone in rank: still closed
    chosen = tree_tuning.best_tree(probability, 5, 3)
    assert _closed(set(chosen)) and len(chosen) == 4
    validate_parents(tree_from_paths(chosen))
    with pytest.raises(ValueError, match="nodes >= 1"):
        tree_tuning.best_tree(probability, 0, 3)


@pytest.fixture(scope="module")
def greedy_texts(tmp_path_factory):
    """A target, a draft trained a little on its greedy answers (right often, not always), and
    prompts with their greedy continuations."""
    target = reference_llama(TINY, seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, TINY.vocab_size, (int(n),), generator=gen).tolist() for n in (6, 4, 9, 5)]
    sequences = Sequences()
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        text = torch.cat([ids, target.greedy_reference(ids, 40)], 1)[0].tolist()
        texts.append(text)
        sequences.add(text, len(prompt), True, "gsm8k")
    config = TrainConfig(kind="eagle3", steps=60, batch_size=4, lr=3e-3, warmup_steps=5, ttt_steps=3,
                         eval_every=10**6, ckpt_every=10**6, eval_sequences=1, noise=0.0)
    folder = tmp_path_factory.mktemp("tune")
    train(target, folder, folder / "run", config, sequences=sequences, progress=False, log=lambda _: None)
    from specc.draft.eagle import load_draft

    draft = load_draft(folder / "run" / "draft-best.safetensors", target, dtype=torch.float32)
    return target, draft, prompts, texts


@pytest.mark.parametrize("paths", [((0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0)), ((0,), (0, 0), (0, 0, 0)),
                                   ((0,), (1,), (2,), (3,))])
def test_fp32_decoding_with_a_static_tree_accepts_what_the_ranks_predict(greedy_texts, paths):
    target, draft, prompts, texts = greedy_texts
    depth = max(map(len, paths))
    ranks = tree_tuning.ranks_by_sequence(target, draft, texts, depth, [len(p) for p in prompts])
    compiled = torch.compile(target, backend=specc.backend(draft=draft, tree=tree_from_paths(paths)))
    out = specc.generate(compiled, prompts, max_new_tokens=30, compile=False)
    actual = out.accept_lengths_by_sequence()
    lengths = set()
    for prompt_ranks, steps, prompt in zip(ranks, actual, prompts):
        # the last step may be cut short by the token budget: compare the ones before it
        predicted = tree_tuning.predicted_accepts(prompt_ranks, paths, steps=len(steps) - 1)
        assert len(predicted) >= 5, "too few rows to compare"
        assert steps[:len(predicted)] == predicted, (paths, prompt)
        lengths |= set(predicted)
    assert len(lengths) >= 2, lengths  # the draft is right sometimes: a comparison with content


def test_with_a_draft_vocabulary_decoding_accepts_what_its_ranks_predict_and_stays_lossless(greedy_texts):
    from specc.draft.vocab import draft_vocab_from_counts, response_token_counts

    target, draft, prompts, texts = greedy_texts
    sequences = Sequences()
    for prompt, text in zip(prompts, texts):
        sequences.add(text, len(prompt), True, "gsm8k")
    counts = response_token_counts(sequences, TINY.vocab_size)
    written = int((counts > 0).sum())
    # leave out a few of the tokens the target writes: some chains now fail where they held
    ids = draft_vocab_from_counts(counts, written - 3)
    paths = ((0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0))
    full_ranks = tree_tuning.ranks_by_sequence(target, draft, texts, 3, [len(p) for p in prompts])
    plain = specc.generate(torch.compile(target, backend=specc.backend()), prompts, max_new_tokens=30, compile=False)
    draft.set_draft_vocab(ids)
    try:
        ranks = tree_tuning.ranks_by_sequence(target, draft, texts, 3, [len(p) for p in prompts])
        out = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=tree_from_paths(paths))),
                             prompts, max_new_tokens=30, compile=False)
    finally:
        draft.set_draft_vocab(None)
    assert out.tokens == plain.tokens
    outside = torch.cat(ranks) == len(ids)
    assert outside.any(), "no target token fell outside the draft vocabulary: the test has no content"
    assert not torch.equal(torch.cat(ranks), torch.cat(full_ranks))
    for prompt_ranks, steps in zip(ranks, out.accept_lengths_by_sequence()):
        predicted = tree_tuning.predicted_accepts(prompt_ranks, paths, steps=len(steps) - 1)
        assert steps[:len(predicted)] == predicted


def test_tune_tree_from_saved_ranks_writes_valid_trees_and_named_trees_expectations(tmp_path):
    gen = torch.Generator().manual_seed(0)
    # a head right 70% of the time at rank 0, otherwise spread over ranks 1..5
    ranks = torch.where(torch.rand(500, 4, generator=gen) < 0.7, 0, torch.randint(1, 6, (500, 4), generator=gen))
    torch.save({"prompts": "synthetic", "ranks": ranks.to(torch.int16)}, tmp_path / "ranks.pt")
    out = tmp_path / "tuning.json"
    args = ["tune-tree", "--from-ranks", str(tmp_path / "ranks.pt"), "--nodes", "4,9", "--depths", "2,4", "--out", str(out),
            "--plot", str(tmp_path / "tuning.png")]
    assert specc.cli.main(args) == 0
    assert (tmp_path / "tuning.png").stat().st_size > 1000
    import json

    report = json.loads(out.read_text())
    assert report["starts"] == 500 and report["from_ranks"] == [{"prompts": "synthetic"}]
    chain = report["named_trees"]["chain:4"]
    reach = torch.cumprod((ranks == 0).double(), dim=1).mean(0)  # P(first d drafts all right)
    assert chain == pytest.approx(1 + float(reach.sum()))
    assert report["chain_reach"] == pytest.approx(reach.tolist())
    for tree in report["trees"]:
        parents = tree_from_paths(tree["paths"])
        validate_parents(parents)
        assert len(parents) == tree["nodes"] and tree["levels"] <= tree["depth"]
    # the 9-node tree of depth <= 4 beats the 4-node chain of the same depth budget
    best = {(t["nodes"], t["depth"]): t["expected_accept_length"] for t in report["trees"]}
    assert best[(9, 4)] >= best[(4, 4)] >= best[(4, 2)] - 1e-12
    with pytest.raises(SystemExit, match="4 deep"):
        specc.cli.main(["tune-tree", "--from-ranks", str(tmp_path / "ranks.pt"), "--depths", "6", "--out", str(out)])


def test_tuned_tree_names_the_sizes_there_are(tmp_path):
    table = tmp_path / "trees.json"
    table.write_text('{"trees": [{"nodes": 4, "depth": 2, "paths": [[0], [1], [0, 0]]}]}')
    assert tree_tuning.tuned_tree(4, 2, table) == [-1, 0, 0, 1]
    with pytest.raises(ValueError, match="there are tuned:4,2"):
        tree_tuning.tuned_tree(5, 2, table)


def test_the_shipped_tuned_trees_load_as_plans():
    from specc.generate import tree_plan

    import json

    report = json.loads(tree_tuning.TUNED_TREES.read_text())
    for tree in report["trees"]:
        plan = tree_plan(f"tuned:{tree['nodes']},{tree['depth']}")
        assert plan.size == tree["nodes"] and plan.max_depth == tree["levels"]
    with pytest.raises(ValueError, match="give the size and the depth"):
        tree_plan("tuned:48")


def test_a_tree_option_names_another_tuned_table(tmp_path):
    from specc.generate import tree_plan

    table = tmp_path / "chat.json"
    table.write_text('{"trees": [{"nodes": 4, "depth": 2, "paths": [[0], [1], [0, 0]]}]}')
    plan = tree_plan(f"tuned:4,2,{table}")
    assert list(plan.parents) == [-1, 0, 0, 1]
    with pytest.raises(ValueError, match="there are tuned:4,2"):
        tree_plan(f"tuned:5,2,{table}")
    with pytest.raises(ValueError, match="no tuned-tree table at"):
        tree_plan(f"tuned:4,2,{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="give the size and the depth"):
        tree_plan(f"tuned:4,x,{table}")


def test_tuned_chat_names_the_shipped_chat_table():
    from specc.generate import tree_plan

    import json

    report = json.loads(tree_tuning.CHAT_TUNED_TREES.read_text())
    for tree in report["trees"]:
        plan = tree_plan(f"tuned-chat:{tree['nodes']},{tree['depth']}")
        assert list(plan.parents) == tree_tuning.tuned_tree(tree["nodes"], tree["depth"], tree_tuning.CHAT_TUNED_TREES)
        assert plan.size == tree["nodes"] and plan.max_depth == tree["levels"]
    # the two tables tune different trees: the name must pick the chat one, not the default table
    assert list(tree_plan("tuned-chat:64,4").parents) != list(tree_plan("tuned:64,4").parents)
    with pytest.raises(ValueError, match="give the size and the depth, e.g. 'tuned-chat:48,6'"):
        tree_plan("tuned-chat:64")
    with pytest.raises(ValueError, match="names the shipped chat-tuned table"):
        tree_plan(f"tuned-chat:64,4,{tree_tuning.TUNED_TREES}")
    with pytest.raises(ValueError, match="no tuned tree of 65 nodes"):
        tree_plan("tuned-chat:65,4")


def test_every_default_tree_of_the_shipped_head_loads():
    from specc.draft import SHIPPED_HEAD_TREES
    from specc.generate import tree_for_batch, tree_plan

    for batch, tree in SHIPPED_HEAD_TREES.items():
        assert tree_for_batch(SHIPPED_HEAD_TREES, batch) == tree
        assert tree_plan(tree).size >= 2
