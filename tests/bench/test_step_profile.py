"""specc/bench/step_profile.py on CPU: the per-step table is built from the profiled steps, and
it sees what a step really runs (a tree's step runs its draft's and the tree's ops on top of
the plain step's)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from specc.bench import step_profile
from specc.draft.eagle import DraftConfig, EagleDraft
from specc.models.llama import LlamaConfig
from tests.models_factory import reference_llama
from tests.strategies import seeded_weights

SMALL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def profiled():
    target = reference_llama(SMALL, seed=1)
    draft = seeded_weights(EagleDraft(DraftConfig.for_target(SMALL)), 2).attach_to(target).eval()
    return step_profile.run(target, draft, [3, 1, 4, 1, 5], ["chain:3"], steps=4, warm_tokens=4, compile=False,
                            log=lambda text: None)


def test_each_configuration_tables_its_ops_per_step(profiled):
    plain, chain = profiled
    assert (plain["tree"], chain["tree"]) == ("plain", "chain:3")
    for result in profiled:
        rows = result["kernels"]
        assert rows and result["steps"] == 4 and not result["cuda_graph"]
        assert result["kernels_per_step"] == pytest.approx(sum(r["calls_per_step"] for r in rows))
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert [r["us_per_step"] for r in rows] == sorted((r["us_per_step"] for r in rows), reverse=True)
        kinds = result["by_kind"]
        assert sum(k["kernels_per_step"] for k in kinds.values()) == pytest.approx(result["kernels_per_step"])
        # every layer's attention is specc's op, once per layer per step
        attention = [r for r in rows if r["name"] == "specc::tree_attention"]
        assert attention and attention[0]["kind"] == "specc"
    plain_attention = next(r for r in plain["kernels"] if r["name"] == "specc::tree_attention")
    assert plain_attention["calls_per_step"] == SMALL.num_hidden_layers


def test_a_trees_step_runs_the_plain_steps_ops_and_more(profiled):
    plain, chain = profiled
    assert chain["kernels_per_step"] > plain["kernels_per_step"]
    names = {r["name"] for r in chain["kernels"]}
    assert "specc::verify_greedy" in names and "specc::verify_greedy" not in {r["name"] for r in plain["kernels"]}


def test_kernel_kinds_follow_the_names():
    assert step_profile.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert step_profile.kernel_kind("_tree_attention_prefix_kernel") == "specc"
    assert step_profile.kernel_kind("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "inductor"
    assert step_profile.kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"
    assert step_profile.kernel_kind("nvjet_sm90_tst_8x64_64x16_4x1_v_bz_TNN") == "gemm"
    # Inductor names a fused kernel after the ops around it; specc's own kernels are not "triton_"
    assert step_profile.kernel_kind("triton_poi_fused__to_copy_add_cat_cos_kv_write_mul_neg_sin_1") == "inductor"
    assert step_profile.kernel_kind("topk_chunks_kernel") == "specc"
    assert step_profile.kernel_kind("select_tree_rank_kernel") == "specc"
    assert step_profile.kernel_kind("void at::native::mbtopk::gatherTopK<float, unsigned int, 2>") == "other"


def test_summary_and_command_line(profiled):
    text = step_profile.summary(profiled[1], top=3)
    assert text.startswith("--- chain:3:") and "by kind:" in text and len(text.splitlines()) == 5
    parser = argparse.ArgumentParser()
    step_profile.add_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", "--trees", "eagle;dynamic:8,8,64", "--steps", "7"])
    assert args.steps == 7 and args.func is step_profile.cmd_profile
    with pytest.raises(SystemExit, match="separate trees with ';'"):
        step_profile.cmd_profile(parser.parse_args(["profile", "--trees", "eagle,chain:6"]))


def test_on_a_gpu_the_rows_are_the_kernels_own_spans():
    """The CUDA branch, on events shaped like the profiler's: only device kernels count, by
    their spans; the CPU ops that launched them do not."""
    from types import SimpleNamespace

    def kernel(name, start, end):
        span = SimpleNamespace(elapsed_us=lambda: end - start)
        return SimpleNamespace(device_type=SimpleNamespace(name="CUDA"), name=name, time_range=span)

    cpu_op = SimpleNamespace(device_type=SimpleNamespace(name="CPU"), name="aten::mm", self_cpu_time_total=40.0)
    events = [kernel("triton_poi_fused_add_0", 0, 3), kernel("triton_poi_fused_add_0", 5, 8),
              kernel("sm90_xmma_gemm_bf16", 10, 22), cpu_op]
    rows = step_profile.kernel_rows(events, steps=2, device_kernels=True)
    assert [(r["name"], r["calls_per_step"], r["us_per_step"]) for r in rows] == [
        ("sm90_xmma_gemm_bf16", 0.5, 6.0), ("triton_poi_fused_add_0", 1.0, 3.0)]
    assert [r["kind"] for r in rows] == ["gemm", "inductor"] and rows[0]["share"] == pytest.approx(2 / 3)


def test_the_timeline_is_one_steps_kernels_in_launch_order():
    """step_timeline: the first step's kernels sorted by start (events arrive in any order),
    starts relative to the step's first kernel, CPU ops left out."""
    from types import SimpleNamespace

    def kernel(name, start, end):
        span = SimpleNamespace(start=start, elapsed_us=lambda: end - start)
        return SimpleNamespace(device_type=SimpleNamespace(name="CUDA"), name=name, time_range=span)

    cpu_op = SimpleNamespace(device_type=SimpleNamespace(name="CPU"), name="aten::mm")
    # two steps of three kernels; the second step's kernels come first in the list
    events = [kernel("nvjet_gemm", 120, 130), kernel("topk_chunks_kernel", 131, 133), kernel("triton_poi_fused_0", 110, 114),
              cpu_op, kernel("triton_poi_fused_0", 100, 104), kernel("nvjet_gemm", 105, 109), kernel("topk_chunks_kernel", 109.5, 110)]
    timeline = step_profile.step_timeline(events, steps=2)
    assert [(t["name"], t["kind"], t["start_us"], t["us"]) for t in timeline] == [
        ("triton_poi_fused_0", "inductor", 0, 4), ("nvjet_gemm", "gemm", 5, 4), ("topk_chunks_kernel", "specc", 9.5, 0.5)]
    assert step_profile.step_timeline([cpu_op], steps=2) == []


def test_a_speculative_timeline_splits_into_draft_and_verify_where_the_targets_layers_begin():
    # a 2-layer target: catch-up and one draft level (one tree attention each, a top-k after
    # each), then the verify's 2 layers and its argmax, itself a top-k
    names = ["embed", "tree_attention_kernel", "topk_chunks_kernel", "topk_merge_kernel",
             "gather", "tree_attention_kernel", "topk_chunks_kernel", "topk_merge_kernel",
             "embed", "tree_attention_kernel", "tree_attention_kernel", "topk_chunks_kernel", "topk_merge_kernel",
             "verify_greedy_kernel"]
    timeline = [{"name": name, "start_us": 10.0 * i, "us": 4.0} for i, name in enumerate(names)]
    split = step_profile.draft_verify_split(timeline, n_layers=2)
    assert split == {"draft_kernels": 8, "draft_us": 80.0, "verify_kernels": 6, "verify_us": 54.0}
    # a plain step (one attention per layer) and a draft-less timeline have no split
    assert step_profile.draft_verify_split(timeline[8:], n_layers=2) is None
    assert step_profile.draft_verify_split([], n_layers=2) is None
    text = step_profile.summary({"tree": "t", "kernels_per_step": 14, "us_per_step": 56, "timing": "x", "cuda_graph": True,
                                 "span_us": 134, "phases": split, "by_kind": {}, "kernels": []})
    assert "draft 8 kernels 80 µs, verify/accept/commit 6 kernels 54 µs" in text


def test_a_capacity_too_small_for_the_profile_is_refused_before_any_decode(monkeypatch):
    import specc

    def no_decode(*args, **kwargs):
        raise AssertionError("a configuration was decoded before the capacities were checked")

    monkeypatch.setattr(specc, "generate", no_decode)
    target = reference_llama(SMALL, seed=1)
    # 256 positions hold the plain step's profile but not chain:3's: the tree's check fails
    # before the plain step is decoded
    with pytest.raises(ValueError, match="--max-seq-len 256 is too small .* of chain:3: give at least"):
        step_profile.run(target, None, [3, 1, 4, 1, 5], ["chain:3"], steps=4, warm_tokens=230, compile=False,
                         log=lambda text: None, max_seq_len=256)
    assert step_profile.cache_capacities([3, 1, 4, 1, 5], ["plain", "chain:3"], 4, 4, 2304) == [2304, 2304]


def _report(gpu: str, gemm_us: float) -> dict:
    kernels = [{"name": "nvjet_sm90_tst_8x64", "calls_per_step": 3.0, "us_per_step": gemm_us},
               {"name": "triton_poi_fused_add_kv_write_0", "calls_per_step": 2.0, "us_per_step": 5.0},
               {"name": "topk_chunks_kernel", "calls_per_step": 1.0, "us_per_step": 2.0}]
    return {"environment": {"gpu": gpu}, "results": [{"tree": "plain", "kernels_per_step": 6.0, "kernels": kernels}]}


def test_saved_reports_plot_side_by_side(tmp_path):
    pytest.importorskip("matplotlib")
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(_report("GPU A", 30.0)))
    after.write_text(json.dumps(_report("GPU A", 10.0)))
    png = tmp_path / "plots" / "by_kind.png"
    assert step_profile.main(["--from", f"before={before}", "--from", f"after={after}", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_saved_reports_need_a_plot_and_a_profile_report(tmp_path):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"not": "a profile"}))
    with pytest.raises(SystemExit, match="give --plot"):
        step_profile.main(["--from", str(report)])
    with pytest.raises(SystemExit, match="not a `specc bench profile` report"):
        step_profile.main(["--from", str(report), "--plot", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="cannot read"):
        step_profile.main(["--from", str(tmp_path / "missing.json"), "--plot", str(tmp_path / "x.png")])
