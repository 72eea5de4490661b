"""Correctness checks on the real model that need the GPU (run by scripts/gpu_run.sh).

  - specc's plain greedy equals HF's greedy `generate` (fp32 and bf16);
  - speculative greedy equals specc's plain greedy (fp32 and bf16), for the given draft;
  - where bf16 outputs differ, the logit margin at the first divergent token;
  - the decode step is one CUDA graph: a profiled replay issues one cudaGraphLaunch and no
    kernel launches of its own;
  - no recompilation across generations of different prompt lengths
    (torch.compiler.set_stance("fail_on_recompile")).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import specc
from specc.bench.common import environment, first_divergence, mt_bench_first_turns


def _step_graph_launches(engine) -> dict:
    """Profile one replay of the captured step: what the host launched."""
    from torch.profiler import ProfilerActivity, profile

    graph = engine.loop.step
    if graph is None or not torch.cuda.is_available():
        return {"captured": False}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {
        "captured": True,
        "cudaGraphLaunch": sum(1 for n in names if n.startswith("cudaGraphLaunch")),
        "cudaLaunchKernel": sum(1 for n in names if n.startswith("cudaLaunchKernel") or n == "cuLaunchKernel"),
        "gpu_kernels_in_replay": sum(1 for e in prof.events() if e.device_type.name == "CUDA"),
    }


def _check_config(dtype_name: str, dtype, tree, rows, max_new_tokens: int, draft_path: str | None,
                  device: str = "cuda", compile: bool = True) -> dict:
    from specc.draft.eagle import DraftConfig, EagleDraft, cast_parameters, load_draft
    from specc.models.load import load_hf_llama

    torch._dynamo.reset()
    model, tokenizer = load_hf_llama(dtype=dtype, device=device)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    if draft_path:
        draft = load_draft(draft_path, model)
    else:
        torch.manual_seed(0)
        draft = cast_parameters(EagleDraft(DraftConfig.for_target(_default_config())), dtype, device)
        draft.attach_to(model).eval()
    # the reference is specc's own plain decode, run without Inductor (rewritten graph + kernels)
    plain_c = torch.compile(model, backend=specc.backend())
    spec_c = torch.compile(model, backend=specc.backend(draft=draft, tree=tree))
    max_seq_len = 2048
    section = {"dtype": dtype_name, "tree": str(tree), "prompts": []}
    # both captures (one Dynamo trace each) happen before the no-recompile stance below;
    # what the stance then guards is the generations themselves
    from specc.generate import target_program

    target_program(plain_c)
    start = time.perf_counter()
    specc.generate(spec_c, [prompts[0]], max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, compile=compile)
    section["compile_seconds"] = time.perf_counter() - start
    with torch.compiler.set_stance("fail_on_recompile"):
        for prompt in prompts:
            plain = specc.generate(plain_c, [prompt], max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, compile=False)
            spec = specc.generate(spec_c, [prompt], max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, compile=compile)
            entry = {
                "prompt_tokens": len(prompt),
                "spec_equals_plain": spec.tokens[0] == plain.tokens[0],
                "spec_mean_accept_length": spec.mean_accept_length,
                "spec_step_ms": 1e3 * spec.decode_seconds / max(spec.steps, 1),
            }
            if spec.tokens[0] != plain.tokens[0]:
                entry["spec_vs_plain_divergence"] = first_divergence(model, prompt, spec.tokens[0], plain.tokens[0])
            section["prompts"].append(entry)
    section["no_recompile_across_generations"] = True  # the stance above raises otherwise
    section["spec_step_graph"] = _step_graph_launches(next(iter(spec_c.__dict__["_specc_engines"].values())))
    section["spec_equals_plain"] = sum(p["spec_equals_plain"] for p in section["prompts"])
    del model, plain_c, spec_c, draft
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return section


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CONFIGS = "bf16:eagle;fp32:eagle;bf16:dynamic:8,6,48"


def parse_configs(text: str) -> tuple[tuple[str, str], ...]:
    """'fp32:eagle;bf16:dynamic:8,6,48' -> (("fp32", "eagle"), ("bf16", "dynamic:8,6,48")): a dtype,
    then the tree as `specc generate --tree` takes it (commas belong to the tree)."""
    configs = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        dtype, _, tree = item.partition(":")
        if dtype not in DTYPES or not tree:
            raise ValueError(f"check config {item!r}: write DTYPE:TREE with DTYPE one of {', '.join(DTYPES)}, "
                             f"e.g. 'fp32:eagle;bf16:dynamic:8,6,48'")
        configs.append((dtype, tree))
    if not configs:
        raise ValueError(f"no check configs in {text!r}; e.g. '{DEFAULT_CONFIGS}'")
    return tuple(configs)


def run(draft_path: str | None = None, n_prompts: int = 8, max_new_tokens: int = 64,
        configs: str | tuple = DEFAULT_CONFIGS, out: str | None = None, device: str = "cuda",
        compile: bool = True) -> dict:
    """Each (dtype, tree) config in turn (a tuple of pairs, or the string form of
    `parse_configs`); the report is written after each, so a run cut short by its time limit
    keeps what it finished. `device="cpu", compile=False` runs the same equality checks on a
    CPU (eager programs; slow, but the real model and head)."""
    if isinstance(configs, str):
        configs = parse_configs(configs)
    rows = mt_bench_first_turns(per_category=1)[:n_prompts]
    report = {"environment": environment(), "draft": draft_path or "untrained (random init)",
              "n_prompts": len(rows), "max_new_tokens": max_new_tokens, "device": device, "compile": compile,
              "configs": []}
    for dtype_name, tree in configs:
        report["configs"].append(_check_config(dtype_name, DTYPES[dtype_name], tree, rows, max_new_tokens, draft_path,
                                               device, compile))
        if out:
            Path(out).write_text(json.dumps(report, indent=1))
        print(summary(report), flush=True)
    return report


def _default_config():
    from specc.models.fetch import fetch_default_gguf
    from specc.models.gguf_loader import llama_config_from_gguf

    return llama_config_from_gguf(fetch_default_gguf(progress=False))


def summary(report: dict) -> str:
    lines = [f"GPU {report['environment']['gpu']} | draft: {report['draft']}"]
    for s in report["configs"]:
        n = len(s["prompts"])
        steps = sorted(p["spec_step_ms"] for p in s["prompts"])
        lines.append(
            f"{s['dtype']} tree {s['tree']}: spec==plain {s['spec_equals_plain']}/{n}, no recompile: "
            f"{s['no_recompile_across_generations']}, step graph {s['spec_step_graph']}, "
            f"median spec step {steps[len(steps) // 2]:.2f} ms, compile {s['compile_seconds']:.0f}s"
        )
        for i, p in enumerate(s["prompts"]):
            d = p.get("spec_vs_plain_divergence")
            if d:
                lines.append(f"  prompt {i}: first divergence at token {d['index']}, top-2 margin {d['top2_margin']:.4f}")
    return "\n".join(lines)


def sampling_smoke(batch: int = 64, max_new_tokens: int = 32, device: str = "cuda", compile: bool = True) -> dict:
    """Plain and speculative sampling compile, capture and run at a real batch (regression check
    for the Inductor split-scan failure); returns tokens/s, the accept length and a sample text."""
    from specc.draft.eagle import DraftConfig, EagleDraft, cast_parameters
    from specc.models.load import load_hf_llama

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_hf_llama(dtype=dtype, device=device)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    torch.manual_seed(0)
    draft = cast_parameters(EagleDraft(DraftConfig.for_target(_default_config())), dtype, device)
    draft.attach_to(model).eval()
    report = {}
    for name, backend, rows in (("plain", specc.backend(), batch),
                                ("spec_static", specc.backend(draft=draft, tree="eagle"), 4),
                                ("spec_dynamic", specc.backend(draft=draft, tree="dynamic"), 4)):
        compiled = torch.compile(model, backend=backend)
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=list(range(rows)),
                      max_seq_len=1024, compile=compile)
        specc.generate(compiled, [prompt] * rows, **kwargs)
        out = specc.generate(compiled, [prompt] * rows, **kwargs)
        again = specc.generate(compiled, [prompt] * rows, **kwargs)
        report[name] = {"batch": rows, "tokens_per_second": out.tokens_per_second,
                        "mean_accept_length": out.mean_accept_length, "same_seed_same_tokens": out.tokens == again.tokens,
                        "distinct_outputs": len({tuple(t) for t in out.tokens}),
                        "sample": tokenizer.decode(out.tokens[0])}
        print(name, report[name], flush=True)
    return report
