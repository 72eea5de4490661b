"""specc/bench/systems.py on CPU with tiny shapes: the report is complete and its derived
numbers come from its own medians, the meta-device model is fully initialised, and the timed
verify is the real thing (it equals the reference model on every tree path)."""

from __future__ import annotations

import argparse
import copy
import json
import io
import math

import pytest
import torch

from specc.bench import systems
from specc.bench.common import unique_parameter_bytes
from specc.models.llama import RMSNorm, rope_inv_freq
from specc.passes.pipeline import causal_mask

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}
BATCHES, CONTEXTS, NODES = (1, 2), (32, 64), (1, 4, 8)


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    # one intra-op thread: on two shared cores, more threads wait on each other for no gain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return systems.run(batch_sizes=BATCHES, contexts=CONTEXTS, nodes=NODES, repeats=2, warmup=1, compile=False,
                           device="cpu", dtype=torch.float32, config_overrides=TINY,
                           progress=systems.Progress(io.StringIO()))
    finally:
        torch.set_num_threads(threads)


def _median(row):
    return row["time"]["median_ms"]


def _one(rows, **where):
    found = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, found)
    return found[0]


def test_report_has_every_configuration(report):
    eagle_size = len(systems.tree_parents("eagle"))
    for batch in BATCHES:
        for context in CONTEXTS:
            for section in ("verify", "tree_attention"):
                for nodes in NODES:
                    row = _one(report[section], batch=batch, context=context, nodes=nodes, tree="bfs4")
                    assert row["time"]["repeats"] == 2 and _median(row) > 0
                _one(report[section], batch=batch, context=context, nodes=eagle_size, tree="eagle")
            for section in ("drafting", "accept_commit", "shares"):
                _one(report[section], batch=batch, context=context, tree="eagle")
    expected = len(BATCHES) * len(CONTEXTS) * (len(NODES) + 1)
    assert len(report["verify"]) == len(report["tree_attention"]) == expected
    assert report["plain_step"]["skipped"]
    assert report["settings"]["nodes"] == list(NODES)


def test_ratios_and_shares_come_from_the_measured_medians(report):
    for row in report["verify"]:
        one = _one(report["verify"], batch=row["batch"], context=row["context"], nodes=1)
        assert row["over_verify_1"] == pytest.approx(_median(row) / _median(one))
        assert row["over_compiled_plain"] is None  # no compiled step in this run
    for row in report["tree_attention"]:
        verify = _one(report["verify"], batch=row["batch"], context=row["context"], nodes=row["nodes"], tree=row["tree"])
        assert row["share_of_verify"] == pytest.approx(_median(row) / _median(verify))
        assert row["per_layer_median_ms"] == pytest.approx(_median(row) / TINY["num_hidden_layers"])
    for row in report["shares"]:
        where = {"batch": row["batch"], "context": row["context"], "tree": "eagle"}
        verify, attention = _one(report["verify"], **where), _one(report["tree_attention"], **where)
        assert row["drafting_ms"] == _median(_one(report["drafting"], **where))
        assert row["accept_commit_ms"] == _median(_one(report["accept_commit"], **where))
        assert row["verify_rest_ms"] == pytest.approx(_median(verify) - _median(attention))
        assert row["total_ms"] == pytest.approx(row["drafting_ms"] + _median(verify) + row["accept_commit_ms"])
        assert sum(row["share"].values()) == pytest.approx(1.0)
        assert row["share"]["drafting"] == pytest.approx(row["drafting_ms"] / row["total_ms"])


def test_floors_use_the_parameter_bytes_of_the_model_as_built(report):
    model = systems.build_random_model(systems.llama3_8b_config(**TINY), torch.float32, "cpu")
    weight_bytes = unique_parameter_bytes(model)
    assert report["weights"]["parameter_bytes"] == weight_bytes
    assert weight_bytes == 4 * sum(p.numel() for p in model.parameters())  # untied: both vocab matrices count
    bandwidth = report["copy_bandwidth_bytes_per_s"]
    assert bandwidth > 0
    for row in report["verify"]:
        kv = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * TINY["head_dim"] * row["context"] * row["batch"] * 4
        assert row["floor_with_kv_ms"] == pytest.approx((weight_bytes + kv) / bandwidth * 1e3)


def test_compiled_plain_ratios_only_at_the_plain_steps_batch_and_context(report):
    faked = copy.deepcopy(report)
    faked["plain_step"] = {"batch": 1, "context": 32,
                           "time": {"median_ms": 2.0, "min_ms": 1.9, "max_ms": 2.2, "q1_ms": 1.95, "q3_ms": 2.1, "repeats": 4}}
    systems.derive(faked)
    for row in faked["verify"]:
        if (row["batch"], row["context"]) == (1, 32):
            assert row["over_compiled_plain"] == pytest.approx(_median(row) / 2.0)
        else:
            assert row["over_compiled_plain"] is None
    plain = faked["plain_step"]
    assert plain["weight_floor_ms"] == pytest.approx(faked["weights"]["parameter_bytes"] / faked["copy_bandwidth_bytes_per_s"] * 1e3)
    assert plain["over_weight_floor"] == pytest.approx(2.0 / plain["weight_floor_ms"])
    assert faked["targets"]["plain_over_weight_floor"]["met"] == (plain["over_weight_floor"] <= 1.3)
    assert "| 1 | 32 |" in systems.summary_table(faked)


def test_meta_construction_leaves_nothing_uninitialised():
    config = systems.llama3_8b_config(**TINY)
    model = systems.build_random_model(config, torch.bfloat16, "cpu", seed=3)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    assert len(norms) == 2 * TINY["num_hidden_layers"] + 1
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu", name
        assert torch.isfinite(param).all(), name
        if id(param) in norms:
            assert (param == 1).all(), name
        else:
            assert 0.015 < param.float().std().item() < 0.025, name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, rope_inv_freq(config), rtol=0, atol=0)
    again = systems.build_random_model(config, torch.bfloat16, "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))

    draft = systems.build_random_draft(model, "eagle3")
    for name, param in draft.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
    assert (draft.norm.weight == 1).all()
    torch.testing.assert_close(draft.rotary.inv_freq, rope_inv_freq(draft.config.layer_config()), rtol=0, atol=0)


def test_init_refuses_a_buffer_it_has_no_value_for():
    with torch.device("meta"):
        module = torch.nn.Module()
        module.register_buffer("table", torch.zeros(3))
        module.weight = torch.nn.Parameter(torch.zeros(2))
    module = module.to_empty(device="cpu")
    with pytest.raises(ValueError, match="table"):
        systems.init_random_(module, {})


@pytest.mark.parametrize("tree", [8, "eagle"])
def test_eager_verify_equals_the_reference_model_on_every_tree_path(tree):
    """The timed verify callable, after a real prefill, gives each node the logits the plain
    reference model gives the context followed by the node's root-to-node path; the program
    reads the weights refilled after the trace."""
    torch._dynamo.reset()
    config = systems.llama3_8b_config(**TINY)
    model, program = systems.prepare_model(config, torch.float32, "cpu", seed=5)
    assert 0.015 < model.lm_head.weight.std().item() < 0.025  # the benchmark's weights, not the trace's
    parents = systems.tree_parents(tree)
    batch, context = 2, 6
    k_cache, v_cache = program.new_cache(batch, context + len(parents))
    context_ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program(context_ids, torch.arange(context).expand(batch, context), torch.zeros(batch, dtype=torch.int64),
                causal_mask(batch, context, "cpu"), k_cache, v_cache)
        inputs = systems.tree_inputs(parents, batch, context, config.vocab_size, "cpu", seed=2)
        logits = systems.verify_callable(program, inputs, k_cache, v_cache)()[0]
        for node in range(len(parents)):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            ids = torch.cat([context_ids, inputs.tokens[:, path[::-1]]], dim=1)
            torch.testing.assert_close(logits[:, node], model(ids)[:, -1], rtol=1e-4, atol=1e-5)


def test_bfs_tree_is_a_breadth_first_prefix_of_a_4_ary_tree():
    assert systems.bfs_tree(1) == [-1]
    assert systems.bfs_tree(8) == [-1, 0, 0, 0, 0, 1, 1, 1]
    parents = systems.bfs_tree(64)
    assert all(0 <= p < i for i, p in enumerate(parents) if i) and max(parents.count(p) for p in set(parents)) == 4
    with pytest.raises(ValueError, match="n_nodes"):
        systems.bfs_tree(0)


def test_summary_table_and_plot(report, tmp_path):
    table = systems.summary_table(report)
    for text in ("N=8", "N=25 (eagle)", "| 2 | 64 |", "not measured", "accept+commit"):
        assert text in table
    paths = systems.plot(report, tmp_path)
    assert [p.name for p in paths] == ["systems_verify.png"] and paths[0].stat().st_size > 0


def test_command_line_options():
    parser = argparse.ArgumentParser()
    systems.add_parser(parser.add_subparsers(dest="which"))
    args = parser.parse_args(["systems", "--batch-sizes", "1,4", "--contexts", "512", "--nodes", "1,2",
                              "--repeats", "5", "--no-compile", "--device", "cpu", "--out", "r.json", "--plots", "p"])
    assert (args.batch_sizes, args.contexts, args.nodes, args.repeats) == ([1, 4], [512], [1, 2], 5)
    assert args.no_compile and args.device == "cpu" and args.func is systems.cmd_systems
    defaults = parser.parse_args(["systems"])
    assert (defaults.batch_sizes, defaults.contexts, defaults.nodes) == ([1, 8, 32], [1024, 8192], [1, 8, 16, 32, 64])
    assert not defaults.no_compile and defaults.repeats >= 20
    assert defaults.shapes == "llama3-8b" and not defaults.no_compiled_verify
    small = parser.parse_args(["systems", "--shapes", "smollm2-135m", "--no-compiled-verify"])
    assert small.shapes == "smollm2-135m" and small.no_compiled_verify
    with pytest.raises(SystemExit):
        parser.parse_args(["systems", "--nodes", "1,x"])


def test_kv_bytes_of_llama3_8b():
    # 128 KiB per token in bf16: 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert systems.kv_bytes(systems.LLAMA3_8B, 1, 1, 2) == 128 * 1024
    assert math.isclose(systems.kv_bytes(systems.LLAMA3_8B, 8192, 32, 2) / 1e9, 34.36, rel_tol=1e-3)


def test_main_writes_report_summary_and_plot(tmp_path, monkeypatch, capsys):
    """The command end to end (bf16, as on the GPU), on tiny shapes standing in for Llama-3-8B's."""
    torch._dynamo.reset()
    monkeypatch.setattr(systems, "LLAMA3_8B", systems.llama3_8b_config(**TINY))
    out = tmp_path / "systems.json"
    code = systems.main(["--device", "cpu", "--no-compile", "--batch-sizes", "1", "--contexts", "16", "--nodes", "2",
                         "--repeats", "1", "--out", str(out), "--plots", str(tmp_path)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "torch.bfloat16" and report["settings"]["nodes"] == [1, 2]
    assert {(r["nodes"], r["tree"]) for r in report["verify"]} == {(1, "bfs4"), (2, "bfs4"), (25, "eagle")}
    assert (tmp_path / "systems.md").read_text().strip() == capsys.readouterr().out.strip()
    assert (tmp_path / "systems_verify.png").exists()


def test_a_program_holding_copies_of_the_weights_is_reported():
    class Program:
        module = torch.nn.Linear(2, 2)

    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="not the model's own"):
        systems._check_program_holds_weights(Program(), model)
    Program.module = model
    systems._check_program_holds_weights(Program(), model)  # its own tensors: silent


def test_the_compiled_verify_equals_the_eager_verify():
    """What the compiled-verify rows time is the same program: Inductor's outputs (logits, final
    hidden state, layer features) and cache writes match the eager program's."""
    torch._dynamo.reset()
    model, program = systems.prepare_model(systems.llama3_8b_config(**TINY), torch.float32, "cpu")
    parents = systems.tree_parents(4)
    inputs = systems.tree_inputs(parents, 2, 24, TINY["vocab_size"], program.device, seed=3)
    caches = [systems.random_cache(program, 2, 40, seed=1) for _ in range(2)]
    with torch.no_grad():
        eager = systems.verify_callable(program, inputs, *caches[0])()
        compiled = systems.compiled_verify_callable(program, inputs, *caches[1])()
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(caches[0], caches[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_compiled_verify_ratios_target_and_table_come_from_the_medians(report):
    faked = copy.deepcopy(report)
    faked["plain_step"] = {"batch": 1, "context": 32,
                           "time": {"median_ms": 2.0, "min_ms": 1.9, "max_ms": 2.2, "q1_ms": 1.95, "q3_ms": 2.1, "repeats": 4}}

    def row(nodes, tree, ms):
        return {"batch": 1, "context": 32, "nodes": nodes, "tree": tree,
                "time": {"median_ms": ms, "min_ms": ms, "max_ms": ms, "q1_ms": ms, "q3_ms": ms, "repeats": 2}}

    faked["verify_compiled"] = [row(1, "bfs4", 2.2), row(25, "eagle", 2.4), row(8, "bfs4", 2.6)]
    systems.derive(faked)
    one, _, largest = faked["verify_compiled"]
    eager_8 = _one(faked["verify"], batch=1, context=32, nodes=8, tree="bfs4")
    assert largest["over_verify_1"] == pytest.approx(2.6 / 2.2)
    assert largest["over_compiled_plain"] == pytest.approx(2.6 / 2.0)
    assert largest["over_eager_verify"] == pytest.approx(2.6 / _median(eager_8))
    target = faked["targets"]["verify_largest_tree_over_plain"]
    assert target["compiled_verify_over_compiled_plain"] == pytest.approx(1.3) and target["met_compiled_verify"] is False
    table = systems.summary_table(faked)
    assert "### Verify compiled by Inductor" in table and "| 1 | 32 | 25 (eagle) | 2.400" in table
    assert "both compiled: not met (1.30x)" in table
    assert "not measured" in systems._compiled_verify_lines(report)[2]  # the fixture ran without compiling


def test_smollm2_shapes_fit_the_shipped_head():
    """The shipped head was trained on the real SmolLM2-135M: its config, derived from these
    shapes, must be the one it was saved with (width, heads, vocabulary, feature layers)."""
    from safetensors import safe_open

    from specc.draft import default_draft_path
    from specc.draft.eagle import DraftConfig

    with safe_open(str(default_draft_path()), "pt") as f:
        shipped = DraftConfig.from_json(f.metadata()["specc_draft_config"])
    assert DraftConfig.for_target(systems.shapes_config("smollm2-135m"), "eagle3") == shipped
    assert systems.shapes_config("llama3-8b", num_hidden_layers=2).hidden_size == 4096
    with pytest.raises(ValueError, match="unknown shapes 'gpt2'.*llama3-8b"):
        systems.shapes_config("gpt2")


def test_a_compiled_run_measures_the_plain_step_and_the_compiled_verifies(monkeypatch):
    """The whole compiled path on CPU (tiny shapes, the plain step's batch and context moved to
    the run's): one plain compile, then verify compiled for N = 1, the default tree and the
    largest N, each row with its ratios and the target filled in."""
    torch._dynamo.reset()
    monkeypatch.setattr(systems, "PLAIN_CONTEXT", 32)
    report = systems.run(batch_sizes=(1,), contexts=(32,), nodes=(1, 4), repeats=1, warmup=1, device="cpu",
                         dtype=torch.float32, config_overrides=TINY, progress=systems.Progress(io.StringIO()))
    assert report["plain_step"]["time"]["median_ms"] > 0
    rows = {(r["nodes"], r["tree"]): r for r in report["verify_compiled"]}
    assert set(rows) == {(1, "bfs4"), (25, "eagle"), (4, "bfs4")}
    plain_ms = report["plain_step"]["time"]["median_ms"]
    for row in rows.values():
        assert row["over_compiled_plain"] == pytest.approx(_median(row) / plain_ms)
        assert row["over_verify_1"] == pytest.approx(_median(row) / _median(rows[(1, "bfs4")]))
    target = report["targets"]["verify_largest_tree_over_plain"]
    assert target["compiled_verify_over_compiled_plain"] == rows[(4, "bfs4")]["over_compiled_plain"]
    assert report["settings"]["compiled_verify_nodes"] == [1, 25, 4]


def test_drafting_is_timed_once_per_draft_vocabulary_size():
    torch._dynamo.reset()
    report = systems.run(batch_sizes=(1,), contexts=(32,), nodes=(1,), repeats=1, warmup=1, compile=False,
                         device="cpu", dtype=torch.float32, config_overrides=TINY, draft_vocabs=(0, 16),
                         progress=systems.Progress(io.StringIO()))
    assert [r["draft_vocab"] for r in report["drafting"]] == [0, 16]
    assert len(report["accept_commit"]) == 1
    assert [r["draft_vocab"] for r in report["shares"]] == [0, 16]
    assert report["settings"]["draft_vocabs"] == [0, 16]
    assert "over 16 tokens" in systems.summary_table(report)
    with pytest.raises(ValueError, match="the model has 128"):
        systems.with_draft_vocab(systems.build_random_draft(systems.prepare_model(
            systems.shapes_config("llama3-8b", **TINY), torch.float32, torch.device("cpu"))[0]), 129)
