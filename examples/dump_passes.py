"""Write specc's pass dumps for the embedded default model and list what each pass did.

    python examples/dump_passes.py specc_dump
Each compile gets a folder: the Dynamo graph, then per pass before.txt, after.txt and
summary.txt, and summary.txt for the whole pipeline.
"""

import sys

import torch

import specc
from specc.generate import target_program
from specc.models.load import load_llama

out = sys.argv[1] if len(sys.argv) > 1 else "specc_dump"
model, _ = load_llama()
compiled = torch.compile(model, backend=specc.backend(dump=out))
program, _ = target_program(compiled)  # traces the model once; the dumps are written then
print(f"dumps in {program.dump_dir}")
for name, summary in program.summaries.items():
    print(f"{name:>18}: {summary}")
