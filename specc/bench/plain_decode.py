"""Plain (non-speculative) decode of the real model: HF eager `generate` against specc's
compiled plain decode, side by side in one run, batch 1, greedy, a fixed number of new tokens
(stop tokens ignored, so both do the same work).

Also reports the decode step's distance from the weight-bandwidth floor (weight bytes over
the GPU's copy bandwidth measured in the same run), and checks that specc's greedy tokens
equal HF's; where they differ (bf16), the logit margin at the first divergent token.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import specc
from specc.bench.common import (copy_bandwidth, environment, first_divergence, hf_greedy, mt_bench_first_turns,
                                unique_parameter_bytes, until_eos)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(
    max_new_tokens: int = 128,
    hf_prompts_per_category: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    prompt_file: str | None = None,
    out: str | Path | None = None,
    limit: int | None = None,
    device: str = "cuda",
) -> dict:
    from specc.models.load import load_hf_llama

    model, tokenizer = load_hf_llama(dtype=dtype, device=device)
    rows = mt_bench_first_turns(prompt_file, limit=limit)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    hf_subset = [i for i, r in enumerate(rows) if sum(1 for s in rows[: i + 1] if s["category"] == r["category"]) <= hf_prompts_per_category]
    max_seq_len = 256 * -(-(max(len(p) for p in prompts) + max_new_tokens) // 256)

    compiled = torch.compile(model, backend=specc.backend())
    start = time.perf_counter()
    specc.generate(compiled, [prompts[0]], max_new_tokens=max_new_tokens, max_seq_len=max_seq_len)
    compile_seconds = time.perf_counter() - start

    specc_runs = []
    for index, prompt in enumerate(tqdm(prompts, desc="specc plain decode")):
        result = specc.generate(compiled, [prompt], max_new_tokens=max_new_tokens, max_seq_len=max_seq_len)
        specc_runs.append({
            "index": index,
            "prompt_tokens": len(prompt),
            "tokens": result.tokens[0],
            "seconds": result.prefill_seconds + result.decode_seconds,
            "decode_seconds": result.decode_seconds,
            "steps": result.steps,
        })

    hf_runs = []
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=8, do_sample=False)  # warm-up
    for index in tqdm(hf_subset, desc="HF eager generate"):
        _sync()
        start = time.perf_counter()
        hf_tokens = hf_greedy(model, prompts[index], max_new_tokens)
        _sync()
        seconds = time.perf_counter() - start
        hf_runs.append({"index": index, "tokens": hf_tokens, "seconds": seconds})

    divergences = []
    for run_hf in hf_runs:
        # compared up to specc's first EOS: HF's min_new_tokens suppresses EOS, specc does not
        ours = until_eos(specc_runs[run_hf["index"]]["tokens"], tokenizer.eos_id)
        found = first_divergence(model, prompts[run_hf["index"]], ours, run_hf["tokens"][: len(ours)])
        if found:
            divergences.append({"prompt_index": run_hf["index"], **found})

    def tps(runs, subset=None):
        chosen = [r for r in runs if subset is None or r["index"] in subset]
        return sum(len(r["tokens"]) for r in chosen) / sum(r["seconds"] for r in chosen)

    subset = set(hf_subset)
    bandwidth = copy_bandwidth() if device == "cuda" else float("nan")
    weight_bytes = unique_parameter_bytes(model)
    step_seconds = statistics.median(r["decode_seconds"] / r["steps"] for r in specc_runs)
    floor_seconds = weight_bytes / bandwidth
    report = {
        "benchmark": "plain decode, batch 1, greedy, MT-Bench first turns",
        "environment": environment(),
        "dtype": str(dtype),
        "max_new_tokens": max_new_tokens,
        "prompts_specc": len(prompts),
        "prompts_hf": len(hf_subset),
        "specc_compile_and_first_run_seconds": compile_seconds,
        "hf_eager_tokens_per_second": tps(hf_runs),
        "specc_tokens_per_second_same_prompts": tps(specc_runs, subset),
        "specc_tokens_per_second_all_prompts": tps(specc_runs),
        "speedup_specc_over_hf_eager": tps(specc_runs, subset) / tps(hf_runs),
        "specc_decode_step_ms_median": step_seconds * 1e3,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weight_bandwidth_floor_ms": floor_seconds * 1e3,
        "step_over_floor": step_seconds / floor_seconds,
        "greedy_equal_prompts": len(hf_runs) - len(divergences),
        "greedy_divergences": divergences,
        "specc_runs": specc_runs,
        "hf_runs": hf_runs,
    }
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def summary_table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"GPU {env['gpu']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']}",
        f"{'decoder':<34}{'tokens/s':>10}",
        f"{'HF generate (eager), ' + str(report['prompts_hf']) + ' prompts':<34}{report['hf_eager_tokens_per_second']:>10.1f}",
        f"{'specc plain, same prompts':<34}{report['specc_tokens_per_second_same_prompts']:>10.1f}",
        f"{'specc plain, all ' + str(report['prompts_specc']) + ' prompts':<34}{report['specc_tokens_per_second_all_prompts']:>10.1f}",
        f"speedup specc / HF eager: {report['speedup_specc_over_hf_eager']:.1f}x",
        f"decode step {report['specc_decode_step_ms_median']:.3f} ms; weight floor {report['weight_bandwidth_floor_ms']:.3f} ms "
        f"({report['weight_bytes'] / 1e6:.0f} MB at {report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s): "
        f"{report['step_over_floor']:.2f}x the floor",
        f"greedy tokens equal to HF on {report['greedy_equal_prompts']}/{report['prompts_hf']} prompts",
    ]
    for d in report["greedy_divergences"]:
        lines.append(f"  prompt {d['prompt_index']}: first divergence at token {d['index']}, top-2 margin {d['top2_margin']:.4f}")
    return "\n".join(lines)
