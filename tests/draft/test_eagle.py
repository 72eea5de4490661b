"""specc/draft/eagle.py: the draft's decode with stacked projections means decode without them,
and rotating inside the ops means rotating before them."""

from __future__ import annotations

import pytest
import torch

from specc.draft.eagle import DraftConfig, DraftConfigError, EagleDraft, StackedProjections
from specc.models.llama import LlamaConfig
from specc.passes.pipeline import causal_mask
from tests.models_factory import reference_llama

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _draft(kind: str, seed: int = 0) -> EagleDraft:
    target = reference_llama(TINY, seed=seed)
    torch.manual_seed(seed)
    return EagleDraft(DraftConfig.for_target(target.config, kind)).attach_to(target).eval()


def _decode(draft: EagleDraft, stacked: StackedProjections | None, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    batch, steps = 2, 5
    tokens = torch.randint(0, TINY.vocab_size, (batch, steps), generator=gen)
    features = torch.randn(batch, steps, TINY.hidden_size, generator=gen)
    k_cache, v_cache = draft.new_cache(batch, 16, torch.float32, "cpu")
    cache_len = torch.tensor([3, 6])
    positions = cache_len[:, None] + torch.arange(steps)
    with torch.no_grad():
        return draft.decode(tokens, features, positions, cache_len, causal_mask(batch, steps, "cpu"),
                            k_cache, v_cache, stacked)


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_decode_with_stacked_projections_equals_decode_without(kind):
    draft = _draft(kind)
    torch.testing.assert_close(_decode(draft, StackedProjections(draft)), _decode(draft, None), rtol=1e-5, atol=1e-5)


def test_decode_rotating_inside_the_ops_equals_decode_rotating_before_them(monkeypatch):
    # SPECC_FUSE_ROTARY=1 (the default) hands the ops q and k before their rotation, with the
    # tables; =0 rotates them first. On the references both compute the same operations.
    draft = _draft("eagle3")
    monkeypatch.setenv("SPECC_FUSE_ROTARY", "0")
    unfused = _decode(draft, StackedProjections(draft))
    monkeypatch.setenv("SPECC_FUSE_ROTARY", "1")
    assert torch.equal(_decode(draft, StackedProjections(draft)), unfused)


def test_refresh_rereads_the_drafts_weights_in_place():
    draft = _draft("eagle", seed=2)
    stacked = StackedProjections(draft)
    qkv = stacked.qkv.data_ptr()
    with torch.no_grad():
        draft.layer.self_attn.k_proj.weight.mul_(-3.0)
        draft.layer.mlp.gate_proj.weight.add_(0.5)
    assert not torch.allclose(_decode(draft, stacked), _decode(draft, None))
    stacked.refresh()
    assert stacked.qkv.data_ptr() == qkv
    torch.testing.assert_close(_decode(draft, stacked), _decode(draft, None), rtol=1e-5, atol=1e-5)


def test_refresh_refuses_a_draft_moved_to_another_dtype():
    draft = _draft("eagle", seed=3)
    stacked = StackedProjections(draft)
    for param in draft.parameters():
        param.data = param.data.double()
    with pytest.raises(DraftConfigError, match="compile the model again"):
        stacked.refresh()


# ----- the draft vocabulary -----------------------------------------------------------------
def _counts(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (TINY.vocab_size,), generator=gen)


def test_proposal_logits_over_a_draft_vocabulary_are_the_full_logits_at_its_ids():
    draft = _draft("eagle3", seed=4)
    hidden = torch.randn(2, 3, TINY.hidden_size)
    full = draft.logits(hidden)
    ids = torch.tensor([0, 5, 6, 17, 40, 63])
    draft.set_draft_vocab(ids)
    torch.testing.assert_close(draft.proposal_logits(hidden), full[..., ids])
    torch.testing.assert_close(draft.logits(hidden), full)  # training still sees the whole vocabulary
    index = torch.tensor([[0, 3, 5]])
    assert draft.proposal_tokens(index).tolist() == [[0, 17, 63]]
    assert draft.proposal_index(torch.tensor([17, 18, 0, 63])).tolist() == [3, -1, 0, 5]
    probs = torch.softmax(torch.randn(2, len(ids)), -1)
    full_probs = draft.full_vocab_probs(probs)
    assert full_probs.shape == (2, TINY.vocab_size)
    torch.testing.assert_close(full_probs[:, ids], probs)
    assert full_probs.sum() == pytest.approx(2.0) and (full_probs[:, 1:5] == 0).all()
    draft.set_draft_vocab(None)
    torch.testing.assert_close(draft.proposal_logits(hidden), full)


def test_a_head_saves_its_token_counts_and_loads_with_its_default_draft_vocabulary(tmp_path):
    from specc.draft.eagle import load_draft
    from specc.draft.vocab import draft_vocab_from_counts

    draft = _draft("eagle3", seed=5)
    target = reference_llama(TINY, seed=5)
    draft.token_counts = _counts()
    draft.use_draft_vocab(24)
    draft.save(tmp_path / "head.safetensors")
    loaded = load_draft(tmp_path / "head.safetensors", target)
    assert torch.equal(loaded.draft_vocab, draft_vocab_from_counts(_counts(), 24))
    assert torch.equal(loaded.token_counts, _counts())
    assert load_draft(tmp_path / "head.safetensors", target, draft_vocab=0).draft_vocab is None
    assert load_draft(tmp_path / "head.safetensors", target, draft_vocab=10).proposal_vocab_size == 10
    # a twin shares the weights and leaves the head as it was
    twin = loaded.with_draft_vocab(8)
    assert twin.proposal_vocab_size == 8 and loaded.proposal_vocab_size == 24
    assert twin.fc.weight is loaded.fc.weight


def test_draft_vocabulary_mistakes_are_named():
    from specc.draft.vocab import draft_vocab_from_counts

    draft = _draft("eagle", seed=6)
    with pytest.raises(ValueError, match="strictly ascending"):
        draft.set_draft_vocab(torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        draft.set_draft_vocab(torch.tensor([1, 64]))
    with pytest.raises(DraftConfigError, match="specc draft-vocab"):
        draft.use_draft_vocab(16)
    with pytest.raises(ValueError, match="does not fit"):
        draft_vocab_from_counts(_counts(), 65)
    draft.token_counts = _counts()
    draft.set_draft_vocab(torch.tensor([1, 2, 3]))  # not the top of the counts: a file could not restore it
    with pytest.raises(DraftConfigError, match="use_draft_vocab"):
        draft.save("/nonexistent/head.safetensors")


def test_the_most_frequent_tokens_break_ties_to_the_lower_id():
    from specc.draft.vocab import coverage, draft_vocab_from_counts

    counts = torch.tensor([5, 9, 9, 0, 9, 1])
    assert draft_vocab_from_counts(counts, 2).tolist() == [1, 2]
    assert draft_vocab_from_counts(counts, 4).tolist() == [0, 1, 2, 4]
    assert coverage(counts, torch.tensor([1, 2])) == pytest.approx(18 / 33)


def test_specc_draft_vocab_writes_a_head_with_its_counts(tmp_path, capsys):
    import specc.cli
    from specc.draft.eagle import load_draft

    draft = _draft("eagle3", seed=7)
    draft.save(tmp_path / "head.safetensors", extra_metadata={"specc_training": "{}"})
    torch.save(_counts(), tmp_path / "counts.pt")
    assert specc.cli.main(["draft-vocab", "--draft", str(tmp_path / "head.safetensors"), "--counts",
                           str(tmp_path / "counts.pt"), "--size", "32", "--out", str(tmp_path / "new.safetensors")]) == 0
    assert "response tokens counted" in capsys.readouterr().out
    loaded = load_draft(tmp_path / "new.safetensors")
    assert loaded.proposal_vocab_size == 32 and torch.equal(loaded.token_counts, _counts())
    torch.testing.assert_close(loaded.fc.weight, draft.fc.weight)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        assert handle.metadata()["specc_training"] == "{}"


def test_specc_draft_vocab_counts_the_response_tokens_of_a_data_dir(tmp_path, capsys):
    import specc.cli
    from specc.draft.data import Sequences, save_sequences
    from specc.draft.eagle import load_draft

    sequences = Sequences()
    sequences.add([1, 2, 3, 9, 9, 9, 4], 3, True, "gsm8k")  # prompt 1, 2, 3: not counted
    sequences.add([5, 6, 4, 4], 2, False, "code")
    save_sequences(tmp_path / "data", sequences)
    _draft("eagle3", seed=8).save(tmp_path / "head.safetensors")
    assert specc.cli.main(["draft-vocab", "--draft", str(tmp_path / "head.safetensors"), "--data-dir",
                           str(tmp_path / "data"), "--size", "2", "--out", str(tmp_path / "new.safetensors")]) == 0
    assert "6 response tokens counted, 2 distinct" in capsys.readouterr().out
    loaded = load_draft(tmp_path / "new.safetensors")
    assert loaded.draft_vocab.tolist() == [4, 9]
    assert loaded.token_counts[[1, 2, 3, 4, 9]].tolist() == [0, 0, 0, 3, 3]


# ----- the draft layer's fused GEMMs (specc::fused_linear) -------------------------------------
def _perturbed_draft(kind: str) -> EagleDraft:
    # norm weights away from their initial ones, so that a norm run without its weight shows
    draft = _draft(kind, seed=4)
    with torch.no_grad():
        for norm in (draft.layer.input_layernorm, draft.layer.post_attention_layernorm, draft.norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape))
    return draft


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_decode_with_fused_linears_equals_decode_without(monkeypatch, kind):
    # SPECC_FUSE_DRAFT_LINEAR=1 runs fc (with its embedding gather), q/k/v, o, gate/up and down as
    # specc::fused_linear with their norms, SwiGLU and residual adds; on the references that is
    # the same sequence of operations, so the outputs are equal bit for bit.
    draft = _perturbed_draft(kind)
    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "0")
    unfused = _decode(draft, StackedProjections(draft))
    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "1")
    assert torch.equal(_decode(draft, StackedProjections(draft)), unfused)


def test_proposal_logits_with_the_fused_norm_equal_the_unfused(monkeypatch):
    draft = _perturbed_draft("eagle")
    hidden = torch.randn(2, 3, TINY.hidden_size)
    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "0")
    unfused = draft.proposal_logits(hidden)
    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "1")
    assert torch.equal(draft.proposal_logits(hidden), unfused)
    draft.set_draft_vocab(torch.tensor([1, 5, 9, 40]))
    fused = draft.proposal_logits(hidden)
    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "0")
    assert fused.shape == (2, 3, 4) and torch.equal(fused, draft.proposal_logits(hidden))


def test_decode_with_given_rotary_tables_equals_decode_computing_them():
    draft = _draft("eagle3", seed=5)
    gen = torch.Generator().manual_seed(6)
    batch, steps = 2, 4
    tokens = torch.randint(0, TINY.vocab_size, (batch, steps), generator=gen)
    features = torch.randn(batch, steps, TINY.hidden_size, generator=gen)
    cache_len = torch.tensor([2, 7])
    positions = cache_len[:, None] + torch.tensor([0, 1, 1, 2])
    outs = []
    for rope in (None, draft.rotary(positions, torch.float32)):
        k_cache, v_cache = draft.new_cache(batch, 16, torch.float32, "cpu")
        with torch.no_grad():
            outs.append(draft.decode(tokens, features, positions, cache_len, causal_mask(batch, steps, "cpu"),
                                     k_cache, v_cache, StackedProjections(draft), rope=rope))
    assert torch.equal(outs[0], outs[1])
    # tables of other positions change the result: decode uses the given ones. The other
    # positions must change the distances between the tokens: rotary attention sees only those
    # (the new cache's prefix keys are zero), so shifting every position by 3 changes nothing
    # but the rounding, and the outputs were within allclose's tolerance on some CPUs.
    k_cache, v_cache = draft.new_cache(batch, 16, torch.float32, "cpu")
    with torch.no_grad():
        other = draft.decode(tokens, features, positions, cache_len, causal_mask(batch, steps, "cpu"), k_cache,
                             v_cache, StackedProjections(draft), rope=draft.rotary(3 * positions, torch.float32))
    assert (other - outs[0]).abs().max() > 1e-3


def test_fuse_draft_linear_switch_refuses_other_values(monkeypatch):
    from specc.draft.eagle import fuse_draft_linear_default

    monkeypatch.setenv("SPECC_FUSE_DRAFT_LINEAR", "yes")
    with pytest.raises(ValueError, match="SPECC_FUSE_DRAFT_LINEAR='yes'; use 0"):
        fuse_draft_linear_default()
