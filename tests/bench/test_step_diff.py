"""`specc bench step-diff` on a tiny Llama on the CPU: two correct implementations step from the
same state to the same tokens and (nearly) the same caches; a step that corrupts one draft cache
position is named, buffer and position."""

from __future__ import annotations

import torch

from specc.bench import step_diff
from tests.bench.test_acceptance_gap import trained  # noqa: F401  (the fixture)

STEPS = 10


def test_the_same_step_twice_differs_nowhere(trained):  # noqa: F811
    target, draft, prompts = trained
    result = step_diff.run(target, draft, prompts[0], "reference", "triton", "chain:3", STEPS, log=lambda _: None)
    assert len(result["steps"]) == STEPS and result["steps_tokens_equal"] == STEPS
    assert result["weights_changed_by_engine_build"] == result["weights_changed_by_the_end"] == []
    assert {r["n_out"][0] for r in result["steps"]} != {1}  # some steps accept drafts: pending_count varies
    for row in result["steps"]:
        assert row["pending_feats"] == 0.0
        for name in ("k_cache", "v_cache", "draft_k", "draft_v"):
            assert row[name]["max"] == 0.0 and row[name]["first_bad_position"] is None, (name, row)


def test_inductor_compiled_step_matches_the_reference_in_fp32(trained):  # noqa: F811
    target, draft, prompts = trained
    torch._dynamo.reset()
    result = step_diff.run(target, draft, prompts[1], "reference", "compiled", "chain:3", STEPS, log=lambda _: None)
    assert result["steps_tokens_equal"] == STEPS
    for row in result["steps"]:
        assert row["pending_feats"] < 1e-4
        assert all(row[name]["first_bad_position"] is None for name in ("k_cache", "v_cache", "draft_k", "draft_v"))


def test_a_step_that_corrupts_one_draft_cache_position_is_named(trained, monkeypatch):  # noqa: F811
    target, draft, prompts = trained
    honest = step_diff.Side.step

    def corrupting(self):
        out = honest(self)
        if self.mode == "triton":
            self.buffers.extra[0][0, 0, 0, 2] += 1.0  # draft_k [L, B, Hkv, S, D], position 2
        return out

    monkeypatch.setattr(step_diff.Side, "step", corrupting)
    lines = []
    result = step_diff.run(target, draft, prompts[0], "reference", "triton", "chain:3", 3, log=lines.append)
    for row in result["steps"]:
        assert row["draft_k"]["first_bad_position"] == 2 and row["draft_k"]["max"] == 1.0
        assert row["draft_v"]["first_bad_position"] is None and row["k_cache"]["first_bad_position"] is None
        assert row["tokens_equal"]  # the corruption comes after the step's own reads
    assert lines[0].startswith("prefill: ") and "draft_k 1.00e+00@2" in lines[1]
