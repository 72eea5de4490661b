"""Compile an unmodified HF LlamaForCausalLM with the specc backend and decode greedily.

    python examples/compile_hf_llama.py            # the embedded SmolLM2-135M-Instruct
"""

import torch

import specc
from specc.models.load import load_hf_llama

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model, tokenizer = load_hf_llama(dtype=dtype, device=device)  # a plain transformers model

compiled = torch.compile(model, backend=specc.backend())
prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
out = specc.generate(compiled, [prompt], max_new_tokens=64, stop_ids=[tokenizer.eos_id])
print(tokenizer.decode(out.tokens[0]))
print(f"{out.tokens_per_second:.1f} tokens/s, {out.mean_accept_length:.2f} tokens per step")

# The same tokens as HF's own greedy generate:
reference = model.generate(torch.tensor([prompt], device=device), max_new_tokens=len(out.tokens[0]), do_sample=False)
print("equal to HF generate:", reference[0, len(prompt):].tolist() == out.tokens[0])
