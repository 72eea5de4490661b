"""specc bench sampling on the CPU: both rules on one tree, every temperature, sane accept lengths."""

from __future__ import annotations

import json

import torch

from specc.bench.sampling_rules import run, summary_table
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

CONFIG = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)


class ByteTokenizer:
    def encode_chat(self, messages):
        return [b % 16 for b in messages[-1]["content"].encode()[:24]]


def test_both_rules_at_every_temperature_on_the_same_tree(tmp_path):
    target = reference_llama(CONFIG, seed=3)
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(CONFIG, "eagle")), 4).attach_to(target).eval()
    report = run(target, ByteTokenizer(), draft, tree="eagle", temperatures=(0.7, 1.0), n_prompts=3,
                 max_new_tokens=12, out=tmp_path / "s.json")
    assert {(r["rule"], r["temperature"]) for r in report["results"]} == {
        (rule, t) for rule in ("rrs", "q_one") for t in (0.7, 1.0)}
    for result in report["results"]:
        # 12 tokens: the first from prefill, 11 from steps that each emit 1 to depth + 1 tokens
        assert result["decode_tokens"] == 3 * 11
        assert 1.0 <= result["mean_accept_length"] <= 6.0
    assert json.loads((tmp_path / "s.json").read_text())["results"] == report["results"]
    assert "rrs / q_one" in summary_table(report)
