"""The bucketed prefill (runtime.cuda_graph.PaddedPrefill): prompts padded to a power-of-two
length decode exactly as at their own length, plain and speculative, one prompt or a batch of
different lengths. On a GPU the buckets are replayed from CUDA graphs (tests/test_generate_gpu.py);
here the padded prefill runs directly, which tests what the graphs add to the meaning: the padding."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

import specc
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from specc.runtime.cuda_graph import MIN_PREFILL_BUCKET, PaddedPrefill, prefill_bucket
from specc.runtime.loop import DecodeLoop
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

SMALL = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def test_buckets_are_powers_of_two_from_the_minimum_up_to_the_capacity():
    assert prefill_bucket(1, 4096) == MIN_PREFILL_BUCKET
    assert prefill_bucket(MIN_PREFILL_BUCKET, 4096) == MIN_PREFILL_BUCKET
    assert prefill_bucket(MIN_PREFILL_BUCKET + 1, 4096) == 2 * MIN_PREFILL_BUCKET
    assert prefill_bucket(53, 4096) == 64
    assert prefill_bucket(300, 512) == 512
    assert prefill_bucket(300, 400) == 400  # capped: the padding's K/V must fit the cache
    assert prefill_bucket(5, 8) == 8
    with pytest.raises(ValueError, match="does not fit a cache of 400"):
        prefill_bucket(401, 400)
    with pytest.raises(ValueError, match="0 tokens"):
        prefill_bucket(0, 400)


def _generate(tree, prompts, pad: bool, monkeypatch, lengths_seen=None):
    target = reference_llama(SMALL, seed=5)
    if tree is None:
        backend = specc.backend()
    else:
        draft = seeded_weights(EagleDraft(DraftConfig.for_target(SMALL, "eagle3")), 9).attach_to(target).eval()
        backend = specc.backend(draft=draft, tree=tree)
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["specc.generate"], "DecodeLoop", functools.partial(DecodeLoop, pad_prefill=pad))
        if lengths_seen is not None:
            honest = PaddedPrefill.__call__

            def spying(self, input_ids, prompt_lens):
                lengths_seen.append(prefill_bucket(input_ids.shape[1], self.capacity))
                return honest(self, input_ids, prompt_lens)

            patch.setattr(PaddedPrefill, "__call__", spying)
        return specc.generate(torch.compile(target, backend=backend), prompts, max_new_tokens=12, compile=False)


@pytest.mark.parametrize("tree", [None, "chain:3", "eagle", "dynamic:3,3,8"])
@pytest.mark.parametrize("prompts", [[[7]], [[5, 17, 33, 2, 9], [1, 2, 3], list(range(20, 40))]])
def test_padded_prefill_decodes_the_same_tokens(tree, prompts, monkeypatch):
    seen: list[int] = []
    exact = _generate(tree, prompts, False, monkeypatch)
    padded = _generate(tree, prompts, True, monkeypatch, seen)
    assert seen and all(length > max(map(len, prompts)) for length in seen)  # it did pad
    assert padded.tokens == exact.tokens
    assert padded.accept_lengths == exact.accept_lengths


@pytest.mark.slow
@pytest.mark.parametrize("tree", [None, "chain:2"])
def test_a_new_bucket_does_not_recompile_the_prefill(tree, monkeypatch):
    # the first bucket (16) equals the head dim (16): Dynamo's duck sizing would tie the two and
    # recompile at the next bucket, which fail_on_recompile turns into an error
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    target = reference_llama(config, seed=5)
    backend = specc.backend()
    if tree is not None:
        draft = seeded_weights(EagleDraft(DraftConfig.for_target(config, "eagle3")), 9).attach_to(target).eval()
        backend = specc.backend(draft=draft, tree=tree)
    compiled = torch.compile(target, backend=backend)
    monkeypatch.setattr(sys.modules["specc.generate"], "DecodeLoop", functools.partial(DecodeLoop, pad_prefill=True))
    first = specc.generate(compiled, [[3, 4, 5]], max_new_tokens=4, max_seq_len=128)
    with torch.compiler.set_stance("fail_on_recompile"):  # the same engine (batch 1), a new bucket (32)
        specc.generate(compiled, [list(range(1, 21))], max_new_tokens=4, max_seq_len=128)
        again = specc.generate(compiled, [[3, 4, 5]], max_new_tokens=4, max_seq_len=128)
    assert again.tokens == first.tokens
