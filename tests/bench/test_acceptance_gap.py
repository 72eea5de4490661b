"""`specc bench gap` on a tiny Llama on the CPU: in fp32, real chain decoding accepts exactly what
the teacher-forced draft predicts, step for step; a draft fed features one position late (the
kind of fault the tool is for) is caught."""

from __future__ import annotations

import pytest
import torch

from specc.bench import acceptance_gap
from specc.draft.data import Sequences
from specc.draft.eagle import DraftConfig
from specc.draft.train import TrainConfig, train
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
DEPTH, NEW = 3, 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A target, prompts, and a draft trained a little on the target's greedy answers to them,
    so that it is right often but not always (accept lengths of every size)."""
    target = reference_llama(TINY, seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, TINY.vocab_size, (6,), generator=gen).tolist() for _ in range(6)]
    sequences = Sequences()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        sequences.add(torch.cat([ids, target.greedy_reference(ids, NEW + 8)], 1)[0].tolist(), len(prompt), True, "gsm8k")
    config = TrainConfig(kind="eagle3", steps=60, batch_size=6, lr=3e-3, warmup_steps=5, ttt_steps=DEPTH,
                         eval_every=10**6, ckpt_every=10**6, eval_sequences=1, noise=0.0)
    folder = tmp_path_factory.mktemp("gap")
    train(target, folder, folder / "run", config, sequences=sequences, progress=False, log=lambda _: None)
    from specc.draft.eagle import load_draft

    draft = load_draft(folder / "run" / "draft-best.safetensors", target, dtype=torch.float32)
    assert draft.config == DraftConfig.for_target(TINY, "eagle3")
    return target, draft, prompts


def test_predicted_accepts_follow_the_steps_roots():
    # prompt of 4; counts[s] for chain starts s; the first step's root is position 4 (the
    # prefill's token), so it reads counts[3]; accepting 3 moves the next root to position 7
    # (counts[6]), accepting 2 more to position 9 (counts[8]), then 1 more (counts[9])
    counts = torch.tensor([0, 0, 0, 2, 9, 9, 1, 0, 3, 0, 0, 0, 0, 0])
    assert acceptance_gap.predicted_accepts(counts, 4, [3, 2, 1, 1], depth=3) == [3, 2, 4, 1]
    # a chain that would run past the text's end (15 tokens), or a step that reaches it, has none
    assert acceptance_gap.predicted_accepts(counts, 4, [3, 2, 1, 1, 1, 1, 1], depth=3) == [3, 2, 4, 1, 1]
    assert acceptance_gap.predicted_accepts(counts, 4, [3, 2, 1, 1, 3], depth=3) == [3, 2, 4, 1]
    assert acceptance_gap.predicted_accepts(counts, 4, [1], depth=1) == [2]  # capped at the depth


def test_compare_counts_steps_as_predicted_and_rates_by_depth():
    numbers = acceptance_gap.compare([1, 3, 2, 4], [1, 3, 3, 4], depth=3)
    assert numbers["equal_share"] == 0.75 and numbers["mean_actual"] == 2.5 and numbers["mean_predicted"] == 2.75
    assert numbers["rate_by_depth_actual"] == [3 / 4, 2 / 3, 1 / 2]


def test_fp32_decoding_accepts_exactly_what_the_teacher_forced_draft_predicts(trained):
    target, draft, prompts = trained
    for mode in ("reference", "triton"):  # the same references on the CPU, through both switches
        result = acceptance_gap.measure_mode(target, draft, prompts, mode, DEPTH, NEW)
        assert result["steps"] > 30
        for row in result["per_prompt"]:
            assert row["actual"] == row["predicted"], (mode, row)
        assert result["equal_share"] == 1.0 and result["weights_changed"] == []
        lengths = {a for row in result["per_prompt"] for a in row["actual"]}
        assert len(lengths) >= 3, lengths  # the draft is right sometimes: a comparison with content


def test_a_draft_fed_features_one_position_late_is_caught(trained, monkeypatch):
    target, draft, prompts = trained
    honest = draft.decode

    def late(tokens, features, *args, **kwargs):
        # every draft input pairs token p + 1 with the feature of p - 1 (the first input keeps its own)
        return honest(tokens, torch.cat([features[:, :1], features[:, :-1]], dim=1), *args, **kwargs)

    monkeypatch.setattr(draft, "decode", late)
    result = acceptance_gap.measure_mode(target, draft, prompts, "reference", DEPTH, NEW)
    assert result["equal_share"] < 0.9
    assert result["mean_actual"] < result["mean_predicted"]


def test_a_spec_reports_chain_rows_are_analysed_like_a_fresh_decode(trained, tmp_path):
    from specc.bench import end_to_end

    target, draft, prompts = trained
    report = end_to_end.run(target, prompts=prompts, draft=draft, trees=[f"chain:{DEPTH}"], max_new_tokens=NEW,
                            hf_prompts=0, compile=False, command="test", progress=False)
    result = acceptance_gap.analyse_spec_report(report, target, draft, prompts, f"chain:{DEPTH}")
    assert result["steps"] > 30 and result["equal_share"] == 1.0  # fp32 on the CPU: as predicted
    assert acceptance_gap.plot([result], tmp_path / "gap.png").stat().st_size > 0
    with pytest.raises(ValueError, match="chains only"):
        acceptance_gap.analyse_spec_report(report, target, draft, prompts, "eagle")


def test_graph_modes_need_a_gpu(trained):
    target, draft, prompts = trained
    with pytest.raises(ValueError, match="CUDA graph"):
        acceptance_gap.measure_mode(target, draft, prompts[:1], "triton_graph", DEPTH, NEW)
    lines = []
    results = acceptance_gap.run(target, draft, prompts[:1], ("reference", "compiled_graph"), DEPTH, 8, log=lines.append)
    assert [r["mode"] for r in results] == ["reference"] and "compiled_graph: skipped" in lines[-1]


def test_an_unknown_mode_is_named_with_the_choices():
    assert acceptance_gap.check_modes(["reference", "compiled_graph"]) == ["reference", "compiled_graph"]
    with pytest.raises(SystemExit, match=r"unknown modes \['bogus'\]; pick among reference, triton"):
        acceptance_gap.check_modes(["reference", "bogus"])
