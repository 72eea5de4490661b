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
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
PROMPTS = [[5, 17, 300, 2, 41, 9], [99, 3], [7, 7, 7, 120, 450]]


@pytest.fixture(scope="module")
def target_and_plain():
    target = reference_llama(CONFIG, seed=3).cuda()
    plain = specc.generate(torch.compile(target, backend=specc.backend()), PROMPTS, max_new_tokens=24)
    return target, plain


@pytest.mark.parametrize("kind, tree", [("eagle3", "eagle"), ("eagle", "dynamic:4,4,16"), ("eagle", "chain:3")])
def test_compiled_spec_with_an_eagle_head_equals_plain_on_the_gpu(target_and_plain, kind, tree):
    target, plain = target_and_plain
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(CONFIG, kind)), 11).attach_to(target).cuda().eval()
    spec = specc.generate(torch.compile(target, backend=specc.backend(draft=draft, tree=tree)), PROMPTS, max_new_tokens=24)
    assert spec.tokens == plain.tokens
    assert spec.steps <= plain.steps
