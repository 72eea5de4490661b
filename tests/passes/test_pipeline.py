"""The pass pipeline on both Llama implementations, across hypothesis-generated configs.

Rewritten programs run as plain GraphModules with the ops' reference implementations, so
many examples fit in CI's minutes; tests/test_generate.py covers the Inductor path.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc
from specc.generate import target_program
from specc.passes.pipeline import causal_mask
from tests.models_factory import hf_llama, reference_llama
from tests.strategies import llama_configs

IMPLEMENTATIONS = {"reference": reference_llama, "hf": hf_llama}


def _eager_logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@settings(max_examples=12)
@given(config=llama_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_program_prefill_then_decode_equals_eager_logits(implementation, config, seed, data):
    torch._dynamo.reset()
    model = IMPLEMENTATIONS[implementation](config, seed)
    program, _ = target_program(torch.compile(model, backend=specc.backend()))
    assert program.n_layers == config.num_hidden_layers
    assert (program.n_heads, program.n_kv_heads, program.head_dim) == (
        config.num_attention_heads, config.num_key_value_heads, config.head_dim)

    batch = data.draw(st.integers(1, 3))
    length = data.draw(st.integers(2, 12))
    split = data.draw(st.integers(1, length - 1))
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = _eager_logits(model, ids)
        k_cache, v_cache = program.new_cache(batch, length + 3)
        cache_len = torch.zeros(batch, dtype=torch.int64)
        positions = torch.arange(split).expand(batch, split)
        chunks = [program(ids[:, :split], positions, cache_len, causal_mask(batch, split, "cpu"), k_cache, v_cache)[0]]
        cache_len += split
        for t in range(split, length):
            step_mask = torch.ones(batch, 1, 1, dtype=torch.bool)
            chunks.append(program(ids[:, t : t + 1], cache_len[:, None].clone(), cache_len, step_mask, k_cache, v_cache)[0])
            cache_len += 1
    got = torch.cat(chunks, dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_program_outputs_hidden_states_for_the_draft():
    from specc.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = reference_llama(config, 1)
    program, _ = target_program(torch.compile(model, backend=specc.backend()))
    ids = torch.randint(0, 64, (1, 6))
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out)))
    with torch.no_grad():
        model(ids)
        k_cache, v_cache = program.new_cache(1, 6)
        logits, final_hidden, *layer_outputs = program(
            ids, torch.arange(6)[None], torch.zeros(1, dtype=torch.int64), causal_mask(1, 6, "cpu"), k_cache, v_cache)
    for hook in hooks:
        hook.remove()
    assert len(layer_outputs) == 3
    torch.testing.assert_close(final_hidden, captured["norm"])
    for i in range(3):
        torch.testing.assert_close(layer_outputs[i], captured[i])


def test_dump_writes_each_pass_before_after_and_summary(tmp_path):
    from specc.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    compiled = torch.compile(reference_llama(config, 2), backend=specc.backend(dump=tmp_path))
    program, _ = target_program(compiled)
    folder = program.dump_dir
    assert folder is not None and folder.parent == tmp_path
    for name in ("01_positions", "02_kv_cache", "03_rotary_fusion", "05_program_signature"):
        assert (folder / name / "before.txt").read_text() != (folder / name / "after.txt").read_text()
        assert (folder / name / "summary.txt").read_text().strip()
    assert (folder / "04_kv_write_fusion" / "summary.txt").read_text().startswith("off")  # off by default
    after = (folder / "02_kv_cache" / "after.txt").read_text()
    assert "torch.ops.specc.tree_attention" in after
    assert "torch._C._nn.scaled_dot_product_attention(" not in after
    assert "rotation moved into 1 of 1 tree_attention and 1 of 1 kv_write" in (folder / "03_rotary_fusion" / "summary.txt").read_text()
    assert "equivalence" in (folder / "summary.txt").read_text()


def test_dump_holds_the_step_graph_and_the_tree_picture(tmp_path):
    from specc.draft.eagle import DraftConfig, EagleDraft
    from specc.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    target = reference_llama(config, 3)
    draft = EagleDraft(DraftConfig.for_target(config)).attach_to(target).eval()
    compiled = torch.compile(target, backend=specc.backend(draft=draft, tree="chain:3", dump=tmp_path))
    specc.generate(compiled, [[1, 2, 3]], max_new_tokens=4)
    folder = next(tmp_path.iterdir())
    step = folder / "06_speculative_step"
    assert (step / "tree.png").read_bytes()[:4] == b"\x89PNG"
    assert "static tree, 4 nodes, depth 3" in (step / "summary.txt").read_text()
    graph = (step / "graph.txt").read_text()
    # the whole step is one graph: target verify, draft layers, acceptance and commit together
    for op in ("specc.tree_attention", "specc.verify_greedy", "specc.commit_kv", "specc.kv_write"):
        assert op in graph, op
    assert (folder / "07_prefill" / "graph.txt").exists()


def test_equivalence_check_accepts_bf16_rounding_and_refuses_wrong_logits():
    from specc.models.llama import LlamaConfig
    from specc.passes.graph_utils import RecognitionError
    from specc.passes.pipeline import check_equivalence, equivalence_bound

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2)
    model = reference_llama(config, 5).to(torch.bfloat16)
    program, _ = target_program(torch.compile(model, backend=specc.backend()))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        right = model(ids)
        # the logits of a program that is off by one position: what a broken rewrite gives
        shifted = model(torch.roll(ids, 1, dims=1))
    assert check_equivalence(program, ids, right) <= equivalence_bound(torch.bfloat16, 8)
    with pytest.raises(RecognitionError, match="differ from the model"):
        check_equivalence(program, ids, shifted)
    # the bound grows with depth (rounding does) and stays far under a wrong program's error
    assert equivalence_bound(torch.bfloat16, 1) == 3e-2 < equivalence_bound(torch.bfloat16, 32) < 0.15
    assert equivalence_bound(torch.float32, 80) == 1e-4
