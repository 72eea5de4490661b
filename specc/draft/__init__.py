"""EAGLE draft heads: the module (eagle.py), its training data (data.py) and training (train.py),
its static trees (tree_tuning.py) and its draft vocabulary (vocab.py).

specc ships one head it trained itself for the embedded SmolLM2-135M-Instruct
(specc/assets/draft/README.md says how it was trained and what it measured).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "assets" / "draft" / "smollm2-135m-instruct-eagle3.safetensors"


# The shipped head's tree per batch size ({largest batch: tree}, the backend's `tree` option), the
# best measured on an H200 (BENCHMARKS.md; 80 MT-Bench first turns, greedy). Batch 1 (seventh run,
# this head): the tuned 64-node tree, 2.32x plain with the head's default draft vocabulary. Batch
# 8 (eighth run) and 32 (ninth run), this head: the tuned 8-node tree, 1.58x and 1.37x plain
# (chain:2 1.46x and 1.33x). The tuned trees suit this head alone (specc/assets/trees).
SHIPPED_HEAD_TREES = {1: "tuned:64,6", 8: "tuned:8,3", 32: "tuned:8,3"}


def default_draft_path() -> Path | None:
    """The head specc ships for the embedded default model, or None when this build has none."""
    return SHIPPED_HEAD if SHIPPED_HEAD.exists() else None
