"""Whole-step CUDA graphs: capture the compiled step once over static buffers, then replay.

A replay launches every kernel of the step (attention included) with one host call, which is
what makes a small model's decode step fast (arXiv:2508.08192, "whole-step CUDA graphs").
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepGraph:
    def __init__(self, step: Callable, args: tuple, warmup: int = 3) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles, autotunes and allocates outside the capture
                step(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*args)
        torch.cuda.synchronize()

    def replay(self):
        self.graph.replay()
        return self.outputs
