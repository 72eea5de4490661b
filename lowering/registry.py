"""Which implementation of the specc:: ops runs.

On CUDA the generated Triton kernels run; everywhere else the reference implementations.
`SPECC_KERNELS=reference` forces the references on CUDA too (for bisecting a wrong result
to a kernel). The choice is read at call time, so a test can flip it with monkeypatch.
"""

from __future__ import annotations

import os



def env_choice(name: str, default: str, choices: dict[str, str]) -> str:
    """The value of the environment switch `name`, read at call time (so a test can flip it with
    monkeypatch): `default` when unset, else one of `choices` (value -> what it does); any
    other value is refused with the choices."""
    choice = os.environ.get(name, default)
    if choice not in choices:
        others = " or ".join(f"{value} ({meaning})" for value, meaning in choices.items() if value != default)
        raise ValueError(f"{name}={choice!r}; use {default} (the default: {choices[default]}) or {others}")
    return choice


def kernel_enabled() -> bool:
    """True when CUDA tensors should go through the generated Triton kernels."""
    return env_choice("SPECC_KERNELS", "triton", {"triton": "the generated kernels on CUDA",
                                                  "reference": "the references everywhere"}) == "triton"
