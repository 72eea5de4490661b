"""specc.generate end to end: greedy equals the model's own greedy decode; bad input fails
clearly and leaves the engine usable."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc
from specc.draft.tree_tuning import CHAT_TUNED_TREES
from specc.models.llama import LlamaConfig
from tests.models_factory import hf_llama, reference_llama
from tests.strategies import llama_configs, prompts

SMALL = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@settings(max_examples=8)
@given(config=llama_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_plain_greedy_equals_reference_greedy(config, seed, data):
    torch._dynamo.reset()
    model = reference_llama(config, seed)
    batch_prompts = data.draw(prompts(config.vocab_size))
    new = data.draw(st.integers(1, 8))
    out = specc.generate(torch.compile(model, backend=specc.backend()), batch_prompts, max_new_tokens=new, compile=False)
    for prompt, tokens in zip(batch_prompts, out.tokens):
        assert tokens == model.greedy_reference(torch.tensor([prompt]), new)[0].tolist()


@pytest.mark.slow
def test_compiled_greedy_equals_hf_generate_for_both_implementations():
    """Through Inductor (CPU), batch of prompts of different lengths."""
    batch_prompts = [[5, 17, 33, 2, 9], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46]]
    hf = hf_llama(SMALL, seed=7)
    expected = [_hf_greedy(hf, p, 12) for p in batch_prompts]
    for model in (hf, reference_llama(SMALL, seed=7)):
        torch._dynamo.reset()
        out = specc.generate(torch.compile(model, backend=specc.backend()), batch_prompts, max_new_tokens=12)
        assert out.tokens == expected
        assert out.tokens_per_second > 0


def test_stop_token_ends_each_sequence_separately():
    model = reference_llama(SMALL, seed=3)
    compiled = torch.compile(model, backend=specc.backend())
    batch_prompts = [[4, 8, 15], [16, 23, 42]]
    free = specc.generate(compiled, batch_prompts, max_new_tokens=10, compile=False)
    stop = free.tokens[0][3]
    out = specc.generate(compiled, batch_prompts, max_new_tokens=10, stop_ids=[stop], compile=False)
    first_stop = free.tokens[0].index(stop)
    assert out.tokens[0] == free.tokens[0][: first_stop + 1]
    expected_other = free.tokens[1][: free.tokens[1].index(stop) + 1] if stop in free.tokens[1] else free.tokens[1]
    assert out.tokens[1] == expected_other


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": [[]]}, "prompt 0 is empty"),
        ({"prompts": [[1, 2], [3, 96]]}, "prompt 1 has token id 96 at position 1, outside the vocabulary"),
        ({"prompts": [[1, -1]]}, "token id -1"),
        ({"prompts": [[1] * 60], "max_new_tokens": 10, "max_seq_len": 64}, "cache holds 64; pass max_seq_len=70"),
        ({"prompts": [[1]], "max_new_tokens": 0}, "max_new_tokens=0"),
        ({"prompts": [[1]], "temperature": -1.0}, "temperature=-1.0 is negative"),
        ({"prompts": [[1]], "top_p": 0.0}, "top_p=0.0 is outside"),
        ({"prompts": [[1], [2]], "seed": [1, 2, 3]}, "3 seeds for 2 prompts"),
    ],
)
def test_bad_input_raises_clear_error_and_engine_stays_usable(kwargs, message):
    model = reference_llama(SMALL, seed=5)
    compiled = torch.compile(model, backend=specc.backend())
    good = specc.generate(compiled, [[1, 2, 3]], max_new_tokens=4, compile=False, max_seq_len=64)
    kwargs = dict(kwargs)
    batch_prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        specc.generate(compiled, batch_prompts, compile=False, **{"max_new_tokens": 4, **kwargs})
    again = specc.generate(compiled, [[1, 2, 3]], max_new_tokens=4, compile=False, max_seq_len=64)
    assert again.tokens == good.tokens


def test_generate_rejects_an_uncompiled_model():
    with pytest.raises(TypeError, match="torch.compile"):
        specc.generate(reference_llama(SMALL), [[1, 2]])


TINY_VOCAB = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def test_sampling_same_seed_same_tokens_whatever_the_batch_position():
    model = reference_llama(SMALL, seed=8)
    compiled = torch.compile(model, backend=specc.backend())
    prompt = [3, 14, 15, 92]
    alone = specc.generate(compiled, [prompt], max_new_tokens=8, temperature=1.0, seed=42, compile=False)
    batch = specc.generate(compiled, [[1, 2], prompt, [7] * 6], max_new_tokens=8, temperature=1.0,
                           seed=[1, 42, 3], compile=False)
    assert batch.tokens[1] == alone.tokens[0]
    other = specc.generate(compiled, [prompt], max_new_tokens=8, temperature=1.0, seed=43, compile=False)
    assert other.tokens[0] != alone.tokens[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_plain_sampling_draws_from_the_shaped_softmax(temperature, top_k, top_p):
    """First sampled tokens over many seeds follow softmax(logits / T) after top-k / top-p."""
    import numpy as np

    from specc.lowering.sampling import shape_logits
    from tests.lowering.test_sampling import chi_square

    model = reference_llama(TINY_VOCAB, seed=9, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # flatter logits, so every token has mass worth testing
            p.mul_(0.5)
    compiled = torch.compile(model, backend=specc.backend())
    prompt = [1, 5, 7]
    trials = 3000
    out = specc.generate(compiled, [prompt] * trials, max_new_tokens=1, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=list(range(trials)), compile=False, max_seq_len=16)
    first = np.bincount([t[0] for t in out.tokens], minlength=TINY_VOCAB.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    probs = shape_logits(logits[None], temperature, top_k, top_p)[0].double().numpy()
    assert first[probs == 0].sum() == 0, "a token outside top-k / top-p was sampled"
    statistic, threshold, _ = chi_square(first, probs)
    assert statistic < threshold


@pytest.mark.parametrize("tree", ["chain:3", "eagle", "dynamic:3,3,8"])
def test_a_fresh_speculative_engine_steps_from_a_state_with_no_negative_cache_position(tree, monkeypatch):
    # The CUDA graph's warm-up steps run on the engine's buffers before any prompt is loaded;
    # from the zero state the draft's catch-up once wrote position cache_len - pending_count = -1,
    # which the Triton kernel turned into a write before the cache's memory.
    from specc.draft.eagle import DraftConfig, EagleDraft
    from specc.generate import Engine, EngineKey, target_program, tree_plan
    from specc.lowering import kv_write
    from specc.passes.decode_step import Sampling
    from tests.strategies import seeded_weights

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    target = reference_llama(config, seed=1)
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(config)), 2).attach_to(target).eval()
    program, backend = target_program(torch.compile(target, backend=specc.backend(draft=draft, tree=tree)))
    key = EngineKey(batch=2, max_seq_len=64, sampling=Sampling(0.0, 0, 1.0), compile=False, cuda_graph=False,
                    tree=tree_plan(tree))
    engine = Engine(program, key, draft)
    written = []
    honest = kv_write.kv_write_reference

    def recording(cache, layer, new, cache_len):
        written.append(int(cache_len.min()))
        honest(cache, layer, new, cache_len)

    monkeypatch.setattr(kv_write, "kv_write_reference", recording)
    with torch.no_grad():
        for _ in range(3):  # what StepGraph's warm-up does
            engine.loop._eager_step(*engine.buffers.step_args())
    assert written and min(written) >= 0, written


# the chat-tuned table (specc/assets/trees) is the first to hold trees past 64 nodes (named here
# by its path); its 64-node, depth-4 tree is the shipped head's batch-1 default
@pytest.mark.parametrize("tree, size", [(f"tuned:128,6,{CHAT_TUNED_TREES}", 128), ("tuned-chat:64,4", 64)],
                         ids=["chat-table-path-128x6", "tuned-chat-64x4"])
def test_speculative_greedy_with_a_chat_tuned_tree_equals_plain(tree, size):
    from specc.draft.eagle import DraftConfig, EagleDraft
    from specc.generate import tree_plan
    from tests.strategies import seeded_weights

    assert tree_plan(tree).size == size
    target = reference_llama(SMALL, seed=4)
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(SMALL, "eagle3")), 6).attach_to(target).eval()
    batch_prompts = [[5, 17, 33, 2, 9], [40, 41]]
    plain = specc.generate(torch.compile(target, backend=specc.backend()), batch_prompts, max_new_tokens=10, compile=False)
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=tree)), batch_prompts,
                          max_new_tokens=10, compile=False)
    assert spec.tokens == plain.tokens
