"""EAGLE draft heads: the module (eagle.py), its training data (data.py) and training (train.py).

specc ships one head it trained itself for the embedded SmolLM2-135M-Instruct
(specc/assets/draft/README.md says how it was trained and what it measured).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "assets" / "draft" / "smollm2-135m-instruct-eagle3.safetensors"


def default_draft_path() -> Path | None:
    """The head specc ships for the embedded default model, or None when this build has none."""
    return SHIPPED_HEAD if SHIPPED_HEAD.exists() else None
