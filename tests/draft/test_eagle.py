"""specc/draft/eagle.py: the draft's decode with stacked projections means decode without them."""

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
