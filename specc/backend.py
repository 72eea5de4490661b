"""The torch.compile backend: `torch.compile(model, backend=specc.backend(...))`.

Dynamo hands the backend the model's graph; the pass pipeline turns it into the target
program (specc.passes.pipeline) that `specc.generate` drives. The compiled model's own
forward stays what it was: Inductor compiles the original graph. When the graph is not a
Llama that specc recognises, the backend warns, names the node, and only compiles the plain
forward: it never returns a wrong result.
"""

from __future__ import annotations

import contextvars
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx

from specc.passes.graph_utils import RecognitionError
from specc.passes.pipeline import TargetProgram, build_target_program


@dataclass
class CaptureSlot:
    """Where the backend leaves its result while specc.generate traces the model."""

    program: TargetProgram | None = None
    error: Exception | None = None
    backend: "SpeccBackend | None" = None


_CAPTURE: contextvars.ContextVar[CaptureSlot | None] = contextvars.ContextVar("specc_capture", default=None)


@dataclass
class SpeccBackend:
    """Backend state: the options of `specc.backend(...)` and the last program it built."""

    draft: object = None
    tree: object = None
    dump: str | os.PathLike | None = None
    verify_rule: str | None = None
    fuse_projections: bool = True
    program: TargetProgram | None = field(default=None, repr=False)
    error: Exception | None = field(default=None, repr=False)

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        slot = _CAPTURE.get()
        try:
            self.program = build_target_program(gm, example_inputs, self.dump, self.fuse_projections)
            self.error = None
        except RecognitionError as error:
            self.program, self.error = None, error
            warnings.warn(
                f"specc did not recognise a Llama in the traced graph ({error}); "
                "the model runs its plain forward compiled by Inductor, without specc's cache or speculation",
                stacklevel=2,
            )
        if slot is not None:
            slot.program, slot.error, slot.backend = self.program, self.error, self
            # specc.generate's probe call runs once: the graph itself is the right answer.
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def backend(draft=None, tree=None, dump: str | os.PathLike | None = None,
            verify_rule: str | None = None, fuse_projections: bool = True) -> SpeccBackend:
    """A specc backend for torch.compile.

    draft: an EAGLE draft head (specc.draft) or None for plain compiled decoding.
    tree:  the draft tree: a static tree's name ("eagle", "chain:5"), a parents list, a dynamic-tree
           spec ("dynamic:8,8,64"), "plain" (no drafting), or one per batch size as a mapping
           {largest batch: tree}, e.g. {1: "eagle", 8: "chain:4", 64: "plain"} (batches past the
           largest key take its tree).
    dump:  folder for the pass dumps (also SPECC_DUMP=dir).
    verify_rule: how sampled trees are verified: None picks the best exact rule for the tree
           ("rrs", the draft's true probabilities, on static trees; "q_one" on dynamic ones);
           "q_one" forces the rule that treats each draft probability as 1 (for comparison).
    fuse_projections: one GEMM for each layer's q/k/v and one for gate/up (fewer, wider kernels
           per decode step), at the memory cost of a stacked copy of those weights (re-read from
           the model before every specc.generate call); False keeps the model's own projections.
    """
    from specc.generate import check_tree_option
    from specc.passes.speculative_step import VERIFY_RULES

    check_tree_option(tree)
    if verify_rule is not None and verify_rule not in VERIFY_RULES:
        raise ValueError(f"verify_rule={verify_rule!r}; pick one of {VERIFY_RULES} or None (the tree's default)")
    if not isinstance(fuse_projections, bool):
        raise TypeError(f"fuse_projections={fuse_projections!r}; pass True or False")
    return SpeccBackend(draft=draft, tree=tree, dump=dump, verify_rule=verify_rule, fuse_projections=fuse_projections)


def registered_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """Entry point for `torch.compile(model, backend="specc", options={...})`.

    Dynamo builds a fresh backend call for every graph, so the options are applied to a
    backend created for that graph; use `specc.backend(...)` to keep one instance.
    """
    options = dict(options or {})
    known = ("draft", "tree", "dump", "verify_rule", "fuse_projections")
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown specc options {sorted(unknown)}; known: {', '.join(known)}")
    return backend(**options)(gm, example_inputs)


def capture(compiled: torch.nn.Module, probe: torch.Tensor, call_kwargs: dict) -> CaptureSlot:
    """Call the compiled model once on `probe` with dynamic batch and length; return what the
    backend built from that trace."""
    slot = CaptureSlot()
    token = _CAPTURE.set(slot)
    try:
        torch._dynamo.mark_dynamic(probe, 0)
        torch._dynamo.mark_dynamic(probe, 1)
        with torch.no_grad():
            compiled(probe, **call_kwargs)
    finally:
        _CAPTURE.reset(token)
    return slot
