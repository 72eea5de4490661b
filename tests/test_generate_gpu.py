"""specc.generate end to end on a CUDA GPU: Inductor-compiled steps in CUDA graphs, the kernels
of specc.lowering (tree attention, select_tree, topk, ...), EAGLE heads with stacked
projections; the speculative output equals plain greedy. fp32, so no bf16 ties decide a token.

The kernel tests (tests/lowering) check each op alone; these check that the compiled step
wires them up: a graph break, a host sync or a wrong kernel would change or stop the output.
"""

from __future__ import annotations

import pytest
import torch

import specc
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.draft.tree_tuning import CHAT_TUNED_TREES
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
PROMPTS = [[5, 17, 300, 2, 41, 9], [99, 3], [7, 7, 7, 120, 450]]
# a 128-node static tree (the chat-tuned table's largest), wider than any tile of one block
CHAT_128 = f"tuned:128,6,{CHAT_TUNED_TREES}"


@pytest.fixture(scope="module")
def target_and_plain():
    target = reference_llama(CONFIG, seed=3).cuda()
    plain = specc.generate(torch.compile(target, backend=specc.backend()), PROMPTS, max_new_tokens=24)
    return target, plain


@pytest.mark.parametrize("kind, tree", [("eagle3", "eagle"), ("eagle", "dynamic:4,4,16"), ("eagle", "chain:3"),
                                        ("eagle3", CHAT_128), ("eagle3", "tuned-chat:64,4")])
def test_compiled_spec_with_an_eagle_head_equals_plain_on_the_gpu(target_and_plain, kind, tree):
    target, plain = target_and_plain
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(CONFIG, kind)), 11).attach_to(target).cuda().eval()
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=tree)), PROMPTS, max_new_tokens=24)
    assert spec.tokens == plain.tokens
    assert spec.steps <= plain.steps


def test_prefill_graphs_of_every_bucket_decode_as_the_ungraphed_prefill(target_and_plain):
    # lengths 2..40 cover the buckets 16, 32 and 64, each captured once and replayed for later
    # prompts of another length in the same bucket
    target, _ = target_and_plain
    compiled = torch.compile(target, backend=specc.backend())
    prompts = [[(7 * i + 3 * j) % CONFIG.vocab_size for j in range(length)] for i, length in enumerate((2, 40, 17, 30, 9))]
    expected = [specc.generate(compiled, [p], max_new_tokens=8, max_seq_len=128, cuda_graph=False).tokens for p in prompts]
    specc.generate(compiled, [prompts[0]], max_new_tokens=8, max_seq_len=128)  # compiles the graphed engine
    with torch.compiler.set_stance("fail_on_recompile"):  # a new bucket is a new graph, not a new compile
        for prompt, tokens in zip(prompts, expected):
            assert specc.generate(compiled, [prompt], max_new_tokens=8, max_seq_len=128).tokens == tokens, len(prompt)
    engine = next(e for k, e in compiled.__dict__["_specc_engines"].items() if k.cuda_graph)
    assert sorted(engine.loop.padded_prefill.graphs) == [16, 32, 64]
