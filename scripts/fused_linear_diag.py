"""Which part of specc::fused_linear's down-projection launch (K = 1536, SwiGLU prologue) is slow
(GPU): the same GEMM with and without the gate, and with the plain operand, across tiles."""
import importlib.util
import torch
spec = importlib.util.spec_from_file_location("bench", "scripts/fused_linear_bench.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
from specc.lowering.fused_linear_triton import fused_linear_triton
g = torch.Generator(device="cuda").manual_seed(0)
for rows in (7, 52):
    for gate in (True, False):
        x = torch.randn(rows, 3072 if gate else 1536, generator=g, device="cuda").bfloat16()
        w = (torch.randn(576, 1536, generator=g, device="cuda") / 40).bfloat16()
        r = torch.randn(rows, 576, generator=g, device="cuda").bfloat16()
        base = bench.graph_time(lambda: torch.nn.functional.linear(x[:, :1536], w))
        for bn, bk, wp, st in [(16, 64, 4, 1), (16, 64, 4, 2), (16, 128, 4, 1), (16, 32, 2, 2), (32, 64, 4, 1), (16, 256, 8, 1)]:
            bm = 16 if rows <= 16 else 64
            t = bench.graph_time(lambda: fused_linear_triton(x, w, None, 1e-5, gate, r, blocks=(bm, bn, bk, wp, st)))
            print(f"rows {rows} gate {gate} cublas {base:5.2f} tiles {bm},{bn},{bk},{wp},{st}: {t:6.2f} us", flush=True)
