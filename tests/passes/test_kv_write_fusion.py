"""passes/kv_write_fusion.py: every layer's kv_write + tree_attention pair becomes one
specc::kv_write_attention on both Llama implementations, what the program computes does not
change, and a pair with something between them that touches the caches is left alone."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import specc
import specc.lowering  # noqa: F401  (registers the ops)
from specc.generate import target_program
from specc.models.llama import LlamaConfig
from specc.passes.kv_write_fusion import fuse_kv_write_into_attention
from specc.passes.pipeline import causal_mask
from tests.models_factory import hf_llama, reference_llama

IMPLEMENTATIONS = {"reference": reference_llama, "hf": hf_llama}
CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2)
OPS = {name: getattr(torch.ops.specc, name).default for name in ("kv_write", "tree_attention", "kv_write_attention")}


def _count(program) -> dict[str, int]:
    return {name: sum(1 for n in program.module.graph.nodes if n.op == "call_function" and n.target is op)
            for name, op in OPS.items()}


def _prefill_and_decode(program, ids):
    """Logits of a 6-token prefill and three one-token steps, and the caches they leave."""
    k_cache, v_cache = program.new_cache(2, 12)
    cache_len = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        logits = [program(ids[:, :6], torch.arange(6).expand(2, 6), cache_len, causal_mask(2, 6, "cpu"),
                          k_cache, v_cache)[0]]
        cache_len += 6
        for t in range(3):
            logits.append(program(ids[:, 6 + t:7 + t], cache_len[:, None] + t, cache_len + t,
                                  torch.ones(2, 1, 1, dtype=torch.bool), k_cache, v_cache)[0])
    return torch.cat(logits, 1), k_cache, v_cache


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_every_layer_writes_and_attends_in_one_op_and_the_program_computes_the_same(implementation, monkeypatch):
    model = IMPLEMENTATIONS[implementation](CONFIG, 3)
    monkeypatch.setenv("SPECC_FUSE_KV_WRITE", "1")
    torch._dynamo.reset()
    fused, _ = target_program(torch.compile(model, backend=specc.backend()))
    assert fused.summaries["kv_write_fusion"] == "fused 3 of 3 kv_write + tree_attention pairs into specc::kv_write_attention"
    assert _count(fused) == {"kv_write": 0, "tree_attention": 0, "kv_write_attention": 3}
    monkeypatch.setenv("SPECC_FUSE_KV_WRITE", "0")
    torch._dynamo.reset()
    apart, _ = target_program(torch.compile(model, backend=specc.backend()))
    assert apart.summaries["kv_write_fusion"].startswith("off")
    assert _count(apart) == {"kv_write": 3, "tree_attention": 3, "kv_write_attention": 0}
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for got, want in zip(_prefill_and_decode(fused, ids), _prefill_and_decode(apart, ids)):
        assert torch.equal(got, want)  # the same reference ops in the same order on the CPU


def _pair_graph(between: bool) -> fx.GraphModule:
    """kv_write then tree_attention on one layer; with `between`, a read of the K cache between them."""
    graph = fx.Graph()
    q, k, v, k_cache, v_cache, cache_len, mask = (graph.placeholder(n) for n in
                                                   ("q", "k", "v", "k_cache", "v_cache", "cache_len", "mask"))
    graph.call_function(OPS["kv_write"], (k_cache, v_cache, 0, k, v, cache_len))
    peek = graph.call_function(torch.sum, (k_cache,)) if between else None
    out = graph.call_function(OPS["tree_attention"], (q, k_cache, v_cache, 0, cache_len, mask, 0.5))
    graph.output((out, peek) if between else out)
    return fx.GraphModule(torch.nn.Module(), graph)


class _OneLayer:
    layers = [None]


@pytest.mark.parametrize("between", [False, True])
def test_a_pair_is_fused_only_when_nothing_between_touches_the_caches(between, monkeypatch):
    monkeypatch.setenv("SPECC_FUSE_KV_WRITE", "1")
    gm = _pair_graph(between)
    summary = fuse_kv_write_into_attention(gm, _OneLayer())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    if between:  # the read must see the write: moving the write down would change what it sees
        assert summary.startswith("fused 0 of 1") and OPS["kv_write"] in targets
    else:
        assert summary.startswith("fused 1 of 1") and targets == [OPS["kv_write_attention"]]


def test_a_bad_switch_value_names_the_choices(monkeypatch):
    from specc.passes.kv_write_fusion import fuse_kv_write_default

    monkeypatch.setenv("SPECC_FUSE_KV_WRITE", "yes")
    with pytest.raises(ValueError, match="SPECC_FUSE_KV_WRITE=.yes.; use 0"):
        fuse_kv_write_default()
