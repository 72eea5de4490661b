"""The pass pipeline: Dynamo's graph of the model in, the target program out.

    recognise skeleton -> positions input -> cached tree attention -> rotary fusion -> kv-write fusion
    -> program signature
    -> fused projections (optional, on by default)
    -> equivalence check (the rewritten program against the original graph on the probe)

With a dump folder (argument, or SPECC_DUMP=dir) every compile writes one folder holding,
per pass, the readable graph before and after and a summary of what it matched and changed.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from specc.passes.fused_projections import fuse_parallel_projections, refresh_stacked_weights
from specc.passes.graph_utils import RecognitionError
from specc.passes.kv_cache import use_cached_tree_attention
from specc.passes.kv_write_fusion import fuse_kv_write_into_attention
from specc.passes.positions import use_position_input
from specc.passes.program_signature import set_program_signature
from specc.passes.rotary_fusion import fuse_rotary_into_attention
from specc.passes.skeleton import LlamaSkeleton, recognise_llama

REWRITES: list[tuple[str, Callable[[fx.GraphModule, LlamaSkeleton], str]]] = [
    ("positions", use_position_input),
    ("kv_cache", use_cached_tree_attention),
    ("rotary_fusion", fuse_rotary_into_attention),
    ("kv_write_fusion", fuse_kv_write_into_attention),
    ("program_signature", set_program_signature),
]
FUSION = ("fused_projections", fuse_parallel_projections)

_compile_counter = itertools.count()


@dataclass
class TargetProgram:
    """The rewritten model: (input_ids, positions, cache_len, tree_mask, k_cache, v_cache)
    -> (logits, final_hidden, *layer_outputs)."""

    module: fx.GraphModule
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    summaries: dict[str, str]
    dump_dir: Path | None = None

    def __call__(self, input_ids, positions, cache_len, tree_mask, k_cache, v_cache):
        return self.module(input_ids, positions, cache_len, tree_mask, k_cache, v_cache)

    def refresh_stacked_weights(self) -> None:
        """Re-read the model's weights into the fused projections' stacked copies (if any)."""
        refresh_stacked_weights(self.module)

    def new_cache(self, batch: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.n_layers, batch, self.n_kv_heads, max_seq_len, self.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be rewritten without touching `gm` (meta copied shallowly)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def causal_mask(batch: int, steps: int, device) -> torch.Tensor:
    return torch.ones(steps, steps, dtype=torch.bool, device=device).tril().expand(batch, steps, steps)


def _dump_dir(dump: str | os.PathLike | None) -> Path | None:
    root = dump if dump is not None else os.environ.get("SPECC_DUMP")
    if not root:
        return None
    folder = Path(root) / f"compile_{os.getpid()}_{next(_compile_counter):03d}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except Exception:  # print_readable needs meta that hand-built graphs may lack
        return gm.code


def _run_original(gm: fx.GraphModule, example_inputs: list, skeleton: LlamaSkeleton) -> torch.Tensor:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    index = placeholders.index(skeleton.input_ids)
    input_ids = example_inputs[index]
    args = []
    for node, value in zip(placeholders, example_inputs):
        args.append(input_ids.shape[skeleton.sym_inputs[node]] if node in skeleton.sym_inputs else value)
    with torch.no_grad():
        out = gm(*args)
    return (out[0] if isinstance(out, (tuple, list)) else out), input_ids


def equivalence_bound(dtype: torch.dtype, n_layers: int) -> float:
    """Relative L2 error allowed between the rewritten program's logits and the model's.

    The two compute the same function with different kernels (specc::tree_attention for SDPA), so
    they differ by rounding, which grows with depth: in bf16, about 6e-3 * sqrt(layers) on random
    Llamas (1 layer 6e-3, 4 layers 1.3e-2, 32 layers 4e-2). The bound sits at three times that,
    never under 3e-2; a wrong rewrite (positions, mask, cache) errs by order 1."""
    if dtype == torch.float32 or dtype == torch.float64:
        return 1e-4
    return max(3e-2, 1.8e-2 * math.sqrt(max(1, n_layers)))


def check_equivalence(program: TargetProgram, input_ids: torch.Tensor, expected: torch.Tensor) -> float:
    """Prefill the probe through the rewritten program; it must give the original logits."""
    batch, steps = input_ids.shape
    k_cache, v_cache = program.new_cache(batch, steps)
    positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
    cache_len = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    with torch.no_grad():
        logits = program(input_ids, positions, cache_len, causal_mask(batch, steps, input_ids.device), k_cache, v_cache)[0]
    error = ((logits.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
    bound = equivalence_bound(expected.dtype, program.n_layers)
    if not error <= bound:
        raise RecognitionError(
            None, f"the rewritten program's logits differ from the model's by {error:.2e} (relative), over {bound:.0e}"
        )
    return error


def build_target_program(gm: fx.GraphModule, example_inputs: list, dump: str | os.PathLike | None = None,
                         fuse_projections: bool = True) -> TargetProgram:
    """Run the pipeline on Dynamo's graph; raises RecognitionError when any step fails.
    fuse_projections: stack each layer's q/k/v and gate/up weights (passes/fused_projections.py)."""
    folder = _dump_dir(dump)
    if folder:
        (folder / "00_dynamo_graph.txt").write_text(_readable(gm))
    skeleton = recognise_llama(gm, example_inputs)
    expected, input_ids = _run_original(gm, example_inputs, skeleton)
    summaries = {"skeleton": skeleton.summary()}
    program_gm = copy_graph_module(gm)
    # Re-find the skeleton on the copy so the rewrites never touch the graph Dynamo runs.
    skeleton = recognise_llama(program_gm, example_inputs)
    rewrites = REWRITES + [FUSION] if fuse_projections else REWRITES
    for step, (name, rewrite) in enumerate(rewrites, start=1):
        before = _readable(program_gm) if folder else ""
        summaries[name] = rewrite(program_gm, skeleton)
        if folder:
            sub = folder / f"{step:02d}_{name}"
            sub.mkdir(exist_ok=True)
            (sub / "before.txt").write_text(before)
            (sub / "after.txt").write_text(_readable(program_gm))
            (sub / "summary.txt").write_text(summaries[name] + "\n")
    logits_value = expected
    program = TargetProgram(
        module=program_gm,
        n_layers=len(skeleton.layers),
        n_heads=skeleton.n_heads,
        n_kv_heads=skeleton.n_kv_heads,
        head_dim=skeleton.head_dim,
        hidden_size=skeleton.hidden_size,
        vocab_size=skeleton.vocab_size,
        dtype=_kv_dtype(program_gm),
        device=logits_value.device,
        summaries=summaries,
        dump_dir=folder,
    )
    error = check_equivalence(program, input_ids, expected)
    summaries["equivalence"] = f"rewritten program matches the model's logits on the probe (relative error {error:.1e})"
    if folder:
        (folder / "summary.txt").write_text("\n".join(f"{k}: {v}" for k, v in summaries.items()) + "\n")
    return program


def _kv_dtype(gm: fx.GraphModule) -> torch.dtype:
    # the keys written: kv_write's fourth argument, kv_write_attention's second
    index = {torch.ops.specc.kv_write.default: 3, torch.ops.specc.kv_write_attention.default: 1}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in index:
            value = node.args[index[node.target]].meta.get("example_value")
            if value is not None:
                return value.dtype
    raise RecognitionError(None, "no kv_write found after the cache rewrite")
