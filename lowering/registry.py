"""Which implementation of the specc:: ops runs.

On CUDA the generated Triton kernels run; everywhere else the reference implementations.
`SPECC_KERNELS=reference` forces the references on CUDA too (for bisecting a wrong result
to a kernel). The choice is read at call time, so a test can flip it with monkeypatch.
"""

from __future__ import annotations

import os

_CHOICES = ("triton", "reference")


def kernel_enabled() -> bool:
    """True when CUDA tensors should go through the generated Triton kernels."""
    choice = os.environ.get("SPECC_KERNELS", "triton")
    if choice not in _CHOICES:
        raise ValueError(f"SPECC_KERNELS={choice!r} is not one of {_CHOICES}; unset it or pick one of those")
    return choice == "triton"
