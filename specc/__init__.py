"""specc: a torch.compile backend for lossless EAGLE speculative decoding of Llama models.

    compiled = torch.compile(model, backend=specc.backend())
    out = specc.generate(compiled, prompt_ids, max_new_tokens=128)
"""

from specc.backend import backend
from specc.generate import UnsupportedModelError, generate

__all__ = ["backend", "generate", "UnsupportedModelError"]
