"""EAGLE draft heads: the module (eagle.py), its training data (data.py) and training (train.py),
its static trees (tree_tuning.py) and its draft vocabulary (vocab.py).

specc ships one head it trained itself for the embedded SmolLM2-135M-Instruct
(specc/assets/draft/README.md says how it was trained and what it measured).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "assets" / "draft" / "smollm2-135m-instruct-eagle3.safetensors"


# The shipped head's tree per batch size ({largest batch: tree}, the backend's `tree` option), the
# best measured (BENCHMARKS.md; 80 MT-Bench first turns, greedy). Batch 1 (2026-12-06, H100): the
# 64-node, depth-4 tree of the chat-tuned table, 2.46x plain, where the earlier default
# (tuned:64,6, the training-mix table) ran 2.35x side by side with the depth-5 chat tree (2.43x);
# four levels accept 3.28 tokens against six levels' 3.38 and draft two forwards fewer. Batch 8
# (eighth run) and 32 (ninth run), H200: the tuned 8-node tree, 1.58x and 1.37x plain (chain:2
# 1.46x and 1.33x). The tuned trees suit this head alone (specc/assets/trees).
SHIPPED_HEAD_TREES = {1: "tuned-chat:64,4", 8: "tuned:8,3", 32: "tuned:8,3"}


def default_draft_path() -> Path | None:
    """The head specc ships for the embedded default model, or None when this build has none."""
    return SHIPPED_HEAD if SHIPPED_HEAD.exists() else None
