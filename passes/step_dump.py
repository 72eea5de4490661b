"""Dumps of the compiled programs: the step as Dynamo traced it, the draft tree, the kernels.

Completes the pass dumps (pipeline.py) for one compile folder:
  NN_<program>/graph.txt     the program (prefill or step) as the single graph Inductor received
  NN_<program>/summary.txt   what the program is (tree kind and shape, nodes per level)
  NN_<program>/tree.png      the static draft tree as a picture
  kernels/<name>.py          the generated Triton source of every specc kernel used so far
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def dumping_backend(folder: Path, name: str) -> Callable:
    """An Inductor backend that first writes the graph it receives to folder/name/graph.txt."""

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "graph.txt").write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))
        return compile_fx(gm, example_inputs)

    return backend


def write_tree_dump(folder: Path, name: str, plan) -> None:
    """Describe the step's draft tree; draw it when it is static."""
    from specc.lowering.tree import draw_tree
    from specc.passes.speculative_step import TreePlan

    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    if isinstance(plan, TreePlan):
        levels = ", ".join(f"depth {d}: {len(nodes)}" for d, nodes in enumerate(plan.levels))
        text = f"static tree, {plan.size} nodes, depth {plan.max_depth} ({levels})\nparents: {list(plan.parents)}\n"
        draw_tree(plan.parents, path=sub / "tree.png", title=f"static draft tree: {plan.size} nodes, depth {plan.max_depth}")
    else:
        text = (f"dynamic EAGLE-2 tree: top_k {plan.top_k}, drafted depth {plan.depth}, keeps {plan.size} nodes "
                f"of {plan.candidates} candidates (specc::select_tree); its shape changes every step\n")
    (sub / "summary.txt").write_text(text)


def write_kernel_sources(folder: Path) -> int:
    """Write every generated Triton kernel source of this process; returns how many."""
    from specc.lowering.codegen import all_generated_sources

    sources = all_generated_sources()
    if sources:
        kernels = folder / "kernels"
        kernels.mkdir(exist_ok=True)
        for file_name, source in sources.items():
            (kernels / os.path.basename(file_name)).write_text(source)
    return len(sources)
