"""`specc bench spec` on a tiny reference Llama on the CPU (no Inductor): the report holds every
configuration, greedy speculative output equals plain in fp32, the ratios come from the
measured numbers, the untrained-head swap restores the draft exactly, plots are written."""

from __future__ import annotations

import json

import pytest
import torch

import specc
from specc.bench import end_to_end
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from tests.models_factory import hf_llama, reference_llama
from tests.strategies import seeded_weights

SMALL = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
TREES = ["chain:3", "dynamic:3,3,8"]
BATCHES = [1, 2]  # 3 prompts at batch 2: the last group is padded
NEW = 10


def _draft(target, seed: int = 5) -> EagleDraft:
    return seeded_weights(EagleDraft(DraftConfig.for_target(SMALL)), seed).attach_to(target).eval()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    target = reference_llama(SMALL, seed=7)
    draft = _draft(target)
    before = {name: p.detach().clone() for name, p in draft.named_parameters()}
    out = tmp_path_factory.mktemp("bench") / "spec.json"
    report = end_to_end.run(target, prompts=PROMPTS, draft=draft, trees=TREES, batch_sizes=BATCHES,
                            max_new_tokens=NEW, hf_model=hf_llama(SMALL, seed=7), hf_prompts=2, untrained=True,
                            compile=False, out=out, command="test", progress=False)
    return {"report": report, "draft": draft, "before": before, "out": out}


def _key(config: dict) -> tuple:
    return config["decoder"], config["tree"], config["head"], config["batch"]


def test_report_has_every_configuration_with_padded_rows_dropped(measured):
    configs = measured["report"]["configurations"]
    expected = {("hf", None, None, 1)}
    for batch in BATCHES:
        expected.add(("plain", None, None, batch))
        expected |= {("spec", tree, head, batch) for tree in TREES for head in ("trained", "untrained")}
    assert sorted(map(_key, configs), key=str) == sorted(expected, key=str)
    assert len(configs) == len(expected)
    for config in configs:
        indices = [row["index"] for row in config["per_prompt"]]
        assert indices == ([0, 1] if config["decoder"] == "hf" else [0, 1, 2])
        assert config["new_tokens"] == NEW * len(indices)  # stop tokens ignored: every row gets NEW
        assert config["tokens_per_second"] > 0
        if config["decoder"] != "hf":
            steps = sum(len(row["accept_lengths"]) for row in config["per_prompt"])
            assert sum(config["accept_length_histogram"]) == steps
            decode_tokens = sum(k * n for k, n in enumerate(config["accept_length_histogram"]))
            assert decode_tokens == config["new_tokens"] - len(indices)  # the first token is prefill's
            assert config["mean_accept_length"] == pytest.approx(decode_tokens / steps)
    for config in configs:
        if config["decoder"] == "plain":
            assert config["mean_accept_length"] == 1.0
    warmed = [c["compile_and_warmup_seconds"] for c in configs if c["decoder"] == "plain" or c["head"] == "trained"]
    assert all(seconds is not None and seconds > 0 for seconds in warmed)


def test_greedy_speculative_output_equals_plain_in_fp32(measured):
    spec = [c for c in measured["report"]["configurations"] if c["decoder"] == "spec"]
    assert spec
    for config in spec:
        assert config["equal_to_plain"] == config["compared"] == len(PROMPTS), config["divergences"]
        assert config["divergences"] == []


def test_ratios_are_computed_from_the_measured_numbers(measured):
    report = measured["report"]
    configs = {_key(c): c for c in report["configurations"]}
    over_plain = report["ratios"]["spec_over_plain"]
    assert len(over_plain) == len(TREES) * 2 * len(BATCHES)
    for ratio in over_plain:
        spec = configs[("spec", ratio["tree"], ratio["head"], ratio["batch"])]
        plain = configs[("plain", None, None, ratio["batch"])]
        assert ratio["tokens_per_second"] == pytest.approx(spec["tokens_per_second"] / plain["tokens_per_second"])
    hf = configs[("hf", None, None, 1)]
    assert hf["tokens_per_second"] == pytest.approx(hf["new_tokens"] / sum(r["seconds"] for r in hf["per_prompt"]))
    over_hf = report["ratios"]["over_hf_eager"]
    assert len(over_hf) == len(configs) - 1
    for ratio in over_hf:
        rows = [r for r in configs[(ratio["decoder"], ratio["tree"], ratio["head"], ratio["batch"])]["per_prompt"]
                if r["index"] < 2]  # HF ran on the first two prompts
        on_subset = sum(r["new_tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        assert ratio["tokens_per_second"] == pytest.approx(on_subset / hf["tokens_per_second"])


def test_a_differing_output_is_counted_and_its_divergence_located(measured):
    import copy

    plain = next(c for c in measured["report"]["configurations"] if c["decoder"] == "plain")
    forged = copy.deepcopy(plain)
    row = forged["per_prompt"][1]
    row["tokens"][4] = (row["tokens"][4] + 1) % SMALL.vocab_size
    end_to_end.compare_with_plain(forged, plain, reference_llama(SMALL, seed=7), PROMPTS, greedy=True)
    assert (forged["equal_to_plain"], forged["compared"]) == (len(PROMPTS) - 1, len(PROMPTS))
    [divergence] = forged["divergences"]
    assert (divergence["prompt_index"], divergence["index"]) == (1, 4)
    assert divergence["top2_margin"] >= 0


def test_json_report_holds_environment_parameters_and_per_prompt_numbers(measured):
    saved = json.loads(measured["out"].read_text())
    assert saved["command"] == "test"
    assert set(saved["environment"]) >= {"torch", "triton", "gpu"}
    assert saved["parameters"]["trees"] == TREES and saved["parameters"]["batch_sizes"] == BATCHES
    assert saved["parameters"]["mode"] == "greedy" and saved["parameters"]["untrained"] is True
    assert saved["parameters"]["max_seq_len"] % 256 == 0
    assert saved["ratios"] == measured["report"]["ratios"]
    plain_row = next(c for c in saved["configurations"] if c["decoder"] == "plain")["per_prompt"][0]
    assert len(plain_row["tokens"]) == NEW
    table = end_to_end.summary_table(measured["report"])
    assert len([line for line in table.splitlines() if line.startswith(("hf", "plain", "spec"))]) == len(
        saved["configurations"])


def test_untrained_swap_restores_the_draft_weights_bit_exactly(measured):
    for name, p in measured["draft"].named_parameters():
        assert torch.equal(p, measured["before"][name]), name


def test_swap_changes_the_draft_and_restoring_gives_back_the_accept_lengths():
    target = reference_llama(SMALL, seed=7)
    draft = _draft(target)
    compiled = torch.compile(target, backend=specc.backend(draft=draft, tree="chain:3"))
    tokens = torch.tensor([[4, 8, 15]])
    features = torch.randn(1, 3, SMALL.hidden_size, generator=torch.Generator().manual_seed(0))

    def accept_lengths():
        return specc.generate(compiled, PROMPTS, max_new_tokens=NEW, compile=False).accept_lengths

    with torch.no_grad():
        hidden = draft(tokens, features)
        original = accept_lengths()
        with end_to_end.swapped_weights(draft, end_to_end.untrained_weights(draft, seed=0)):
            assert not torch.allclose(draft(tokens, features), hidden)
            swapped = accept_lengths()
        assert torch.equal(draft(tokens, features), hidden)
    assert accept_lengths() == original
    assert swapped != original  # the compiled engine really ran the other head


def test_plots_are_written(measured, tmp_path):
    pytest.importorskip("matplotlib")
    paths = end_to_end.plot(measured["report"], tmp_path)
    assert [p.name for p in paths] == ["tokens_per_second.png", "accept_lengths.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _CharTokenizer:
    """Stands in for the GGUF tokenizer: ids from the characters of the message."""

    def encode_chat(self, messages):
        return [1] + [ord(c) % SMALL.vocab_size for c in messages[0]["content"]][:12]


def test_prompt_file_sampled_mode_and_missing_head(tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("\n".join(json.dumps({"question_id": i, "category": "x", "turns": [text, "second"]})
                                     for i, text in enumerate(["hello there", "why?", "tell me more"])))
    monkeypatch.setattr(end_to_end, "_default_draft_path", lambda: None)
    report = end_to_end.run(reference_llama(SMALL, seed=2), _CharTokenizer(), prompt_file=prompt_file, n_prompts=2,
                            trees=["chain:2"], max_new_tokens=6, temperature=1.0, hf_prompts=0, untrained=True,
                            compile=False, progress=False)
    assert [p["id"] for p in report["prompts"]] == [0, 1]
    assert report["draft"]["trained"] is False
    assert any("NO TRAINED DRAFT HEAD" in note for note in report["notes"])
    assert any("tokens are not compared" in note for note in report["notes"])
    spec = [c for c in report["configurations"] if c["decoder"] == "spec"]
    assert [c["head"] for c in spec] == ["untrained"]  # the stand-in head is not swapped for itself
    assert spec[0]["equal_to_plain"] is None and spec[0]["mean_accept_length"] >= 1


def test_batch_groups_pad_the_last_group_by_repeating_prompts():
    assert end_to_end.batch_groups(5, 2) == [[(0, True), (1, True)], [(2, True), (3, True)], [(4, True), (0, False)]]
    assert end_to_end.batch_groups(2, 4) == [[(0, True), (1, True), (0, False), (1, False)]]


def test_tree_and_batch_lists_parse_or_name_the_bad_value():
    assert end_to_end.parse_trees("eagle;chain:6;dynamic:8,8,64") == ["eagle", "chain:6", "dynamic:8,8,64"]
    with pytest.raises(ValueError, match="separate trees with ';'"):
        end_to_end.parse_trees("eagle,chain:6")
    assert end_to_end.parse_batch_sizes("1,4,16") == [1, 4, 16]
    with pytest.raises(ValueError, match="'1,0'"):
        end_to_end.parse_batch_sizes("1,0")


def test_command_line_takes_trees_by_semicolon_or_repeated_flag():
    import argparse

    subparsers = argparse.ArgumentParser(prog="specc bench").add_subparsers(dest="which")
    parser = end_to_end.add_parser(subparsers)
    args = parser.parse_args(["--tree", "eagle", "--tree", "dynamic:8,8,64", "--batch-sizes", "1,4", "--untrained"])
    assert args.tree == ["eagle", "dynamic:8,8,64"] and args.batch_sizes == [1, 4] and args.untrained
    defaults = parser.parse_args([])
    assert defaults.tree is None and defaults.trees == list(end_to_end.DEFAULT_TREES)
    assert (defaults.max_new_tokens, defaults.hf_prompts, defaults.batch_sizes) == (256, 8, [1])
    assert defaults.func is end_to_end.cmd_spec
    with pytest.raises(SystemExit):
        parser.parse_args(["--trees", "eagle,chain:6"])


def test_untrained_on_fewer_prompts_is_set_against_plain_on_those_prompts(monkeypatch):
    target = reference_llama(SMALL, seed=7)
    warmed_groups = []
    real_generate = end_to_end._Bench.generate

    def counting(self, compiled, indices, max_new_tokens):
        warmed_groups.append(tuple(indices))
        return real_generate(self, compiled, indices, max_new_tokens)

    monkeypatch.setattr(end_to_end._Bench, "generate", counting)
    report = end_to_end.run(target, prompts=PROMPTS, draft=_draft(target), trees=["chain:3"], batch_sizes=[1],
                            max_new_tokens=NEW, hf_prompts=0, untrained=True, untrained_prompts=2, compile=False,
                            progress=False)
    # plain and the trained head warm up on every prompt, then time it (2 x 2 calls each); the
    # untrained head, in the warm engines, times prompts 0 and 1 only
    assert [warmed_groups.count((i,)) for i in range(3)] == [5, 5, 4]
    configs = {(c["decoder"], c["head"]): c for c in report["configurations"]}
    untrained = configs[("spec", "untrained")]
    assert [r["index"] for r in untrained["per_prompt"]] == [0, 1]
    plain_subset = end_to_end.aggregate([r for r in configs[("plain", None)]["per_prompt"] if r["index"] < 2])
    ratio = next(r for r in report["ratios"]["spec_over_plain"] if r["head"] == "untrained")
    assert ratio["prompts"] == 2
    assert ratio["tokens_per_second"] == pytest.approx(untrained["tokens_per_second"] / plain_subset["tokens_per_second"])
    assert report["parameters"]["untrained_prompts"] == 2


def test_no_configuration_launches_a_step_past_the_budget(measured):
    # stop tokens are ignored, so every group ends at its token budget, which the decode loop
    # sees coming: each step it launched gave some row tokens it kept
    configs = [c for c in measured["report"]["configurations"] if c["decoder"] != "hf"]
    assert configs
    for config in configs:
        assert config["steps_used"] > 0, _key(config)
        assert config["steps_launched"] == config["steps_used"], _key(config)


def test_accept_length_until_eos_counts_the_steps_up_to_the_first_stop_token():
    # tokens[0] from prefill; steps emit 3, 1, 2, 2 tokens: the stop token (7) is the 5th token,
    # emitted by the third step, so three steps count
    tokens, accepts = [4, 5, 6, 8, 9, 7, 1, 1, 1], [3, 1, 2, 2]
    assert end_to_end.steps_until_stop(tokens, accepts, 7) == [3, 1, 2]
    assert end_to_end.steps_until_stop(tokens, accepts, None) == accepts
    assert end_to_end.steps_until_stop(tokens, accepts, 99) == accepts  # never emitted
    assert end_to_end.steps_until_stop([7, 1, 1], [1, 1], 7) == []  # prefill's token was the stop
    rows = [{"new_tokens": 9, "tokens": tokens, "accept_lengths": accepts, "seconds": 1.0, "decode_seconds": 1.0,
             "group_decode_seconds": 1.0}]
    numbers = end_to_end.aggregate(rows, stop_id=7)
    assert numbers["mean_accept_length"] == 2.0 and numbers["mean_accept_length_until_eos"] == 2.0
    assert end_to_end.aggregate(rows, stop_id=5)["mean_accept_length_until_eos"] == 3.0


def test_every_configuration_says_the_weights_were_left_alone(measured):
    # the untrained configurations ran a swapped-in draft (only the target is checked there); the
    # restore is checked by the configuration after them
    assert all(config["weights_changed"] == [] for config in measured["report"]["configurations"])


def test_a_decode_that_writes_into_the_weights_is_reported_from_that_configuration_on(monkeypatch):
    target = reference_llama(SMALL, seed=7)
    draft = _draft(target)
    honest = end_to_end._Bench.generate

    def corrupting(self, compiled, indices, max_new_tokens):
        out = honest(self, compiled, indices, max_new_tokens)
        if "chain" in str(getattr(compiled, "_specc_capture", (None, None))[1]):
            with torch.no_grad():
                draft.layer.mlp.down_proj.weight.view(-1)[-1] += 1.0  # a stray write past a buffer's start
        return out

    monkeypatch.setattr(end_to_end._Bench, "generate", corrupting)
    report = end_to_end.run(target, prompts=PROMPTS[:1], draft=draft, trees=["dynamic:3,3,8", "chain:3"],
                            batch_sizes=[1], max_new_tokens=4, hf_prompts=0, compile=False, command="test",
                            progress=False)
    changed = {config["tree"]: config["weights_changed"] for config in report["configurations"]}
    assert changed[None] == [] and changed["dynamic:3,3,8"] == []
    assert changed["chain:3"] == ["draft.layer.mlp.down_proj.weight"]


def test_a_tree_name_with_a_draft_vocabulary_measures_that_tree_with_a_twin_head_side_by_side():
    target = reference_llama(SMALL, seed=7)
    draft = _draft(target)
    draft.token_counts = torch.arange(SMALL.vocab_size)  # the higher ids "written most"
    report = end_to_end.run(target, prompts=PROMPTS[:2], draft=draft, trees=["chain:3", "chain:3@40"], batch_sizes=[1],
                            max_new_tokens=NEW, hf_prompts=0, compile=False, progress=False, command="test")
    configs = {c["tree"]: c for c in report["configurations"] if c["decoder"] == "spec"}
    assert set(configs) == {"chain:3", "chain:3@40"}
    assert all(c["equal_to_plain"] == 2 for c in configs.values())
    assert draft.draft_vocab is None  # the head itself still proposes from the whole vocabulary
    assert end_to_end.split_draft_vocab("tuned:64,6@8192") == ("tuned:64,6", 8192)
    with pytest.raises(ValueError, match="a token count"):
        end_to_end.parse_trees("eagle@many")
