"""Chat with the embedded default model (SmolLM2-135M-Instruct) through specc.

    python examples/chat.py
"""

import torch

import specc
from specc.models.load import load_llama

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_llama(dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
compiled = torch.compile(model, backend=specc.backend())

messages = []
while True:
    try:
        line = input("you> ").strip()
    except EOFError:
        break
    if not line:
        break
    messages.append({"role": "user", "content": line})
    out = specc.generate(compiled, [tokenizer.encode_chat(messages)], max_new_tokens=256,
                         temperature=0.7, top_p=0.9, seed=len(messages), stop_ids=[tokenizer.eos_id])
    reply = tokenizer.decode([t for t in out.tokens[0] if t != tokenizer.eos_id])
    messages.append({"role": "assistant", "content": reply})
    print(f"smollm> {reply}\n        [{out.tokens_per_second:.0f} tokens/s]")
