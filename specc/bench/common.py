"""What every benchmark needs: prompt sets, the machine's description, a bandwidth ceiling, a per-call GPU timer."""

from __future__ import annotations

import json
import lzma
import platform
import statistics
from importlib import resources
from pathlib import Path

import torch


def mt_bench_first_turns(path: str | Path | None = None, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """MT-Bench (or any JSONL with `turns`) first turns: [{"id", "category", "prompt"}]."""
    if path is None:
        text = resources.files("specc").joinpath("assets/data/mt_bench_question.jsonl").read_text()
    else:
        text = Path(path).read_text()
    rows = []
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        category = item.get("category", "")
        if per_category is not None and seen.get(category, 0) >= per_category:
            continue
        seen[category] = seen.get(category, 0) + 1
        rows.append({"id": item.get("question_id", len(rows)), "category": category, "prompt": item["turns"][0]})
    return rows[:limit] if limit else rows


def read_report(path: str | Path) -> dict:
    """A benchmark's JSON report, plain or xz-compressed (`.json.xz`: how results/ keeps the large
    end-to-end reports, whose per-prompt tokens compress about 20-fold)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no report at {path}; give the path of a `specc bench` JSON (or .json.xz)")
    data = path.read_bytes()
    return json.loads(lzma.decompress(data) if path.suffix == ".xz" else data)


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def copy_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gigabytes * 1e9 / 2)
    src = torch.randn(n // 2, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def graph_us_per_call(fn, calls: int = 50, replays: int = 20) -> float:
    """µs per call of `fn`: `calls` back-to-back calls captured in one CUDA graph, the median of
    `replays` replays (a kernel of a few µs, timed alone, would measure the events' overhead)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def unique_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: each parameter once (tied weights once)."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate`, greedy, exactly max_new_tokens new tokens.

    The explicit all-ones attention mask matters: ChatML prompts contain <|im_end|>, which
    SmolLM2's generation config also names as the pad token, and HF would otherwise guess it is
    padding and mask it. min_new_tokens keeps HF going past EOS by suppressing EOS, so compare
    outputs only up to the first EOS (see `until_eos`).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """The answer proper: tokens up to and including the first EOS."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def first_divergence(model, prompt: list[int], ours: list[int], theirs: list[int]) -> dict | None:
    """Where two greedy continuations first differ, and how close the model's top two were
    there (the logits after `prompt + theirs[:index]`)."""
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            ids = torch.tensor([prompt + theirs[:index]], device=next(model.parameters()).device)
            with torch.no_grad():
                out = model(ids, use_cache=False) if hasattr(model, "generate") else model(ids)
            logits = (out.logits if hasattr(out, "logits") else out)[0, -1].float()
            top = logits.topk(2)
            return {"index": index, "ours": a, "reference": b, "top2_margin": float(top.values[0] - top.values[1]),
                    "logit_gap_between_the_two": float(logits[b] - logits[a])}
    return None


def weights_checksums(module: torch.nn.Module) -> dict[str, int]:
    """An exact integer checksum of every parameter and buffer (their bits summed as integers),
    so that a benchmark can say whether anything it ran wrote into the weights: a stray kernel
    write changes the sum of the tensor it lands in."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    sums = {}
    with torch.no_grad():
        for name, tensor in tensors.items():
            flat = tensor.detach().contiguous().view(-1)
            as_int = flat.view(bits[flat.element_size()]) if flat.is_floating_point() else flat
            sums[name] = as_int.sum(dtype=torch.int64)
        return dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}


def changed_weights(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The names whose checksum differs (or that appeared or vanished)."""
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))


class WeightsWatch:
    """The target's and the draft's weights' checksums when made; `changed()` names the tensors
    ("target.<name>", "draft.<name>") that differ now."""

    def __init__(self, target: torch.nn.Module, draft: object = None) -> None:
        # a draft that is no nn.Module has no weights to watch
        self.modules = {"target": target, **({"draft": draft} if isinstance(draft, torch.nn.Module) else {})}
        self.sums = {key: weights_checksums(module) for key, module in self.modules.items()}

    def changed(self, draft: bool = True) -> list[str]:
        """draft=False: the target only (while another head is swapped into the draft on purpose)."""
        return [f"{key}.{name}" for key, module in self.modules.items() if draft or key != "draft"
                for name in changed_weights(self.sums[key], weights_checksums(module))]
