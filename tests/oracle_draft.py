"""A perfect draft for tests: it knows the target's greedy continuation in advance.

It implements the draft interface the speculative step uses (decode, proposal_logits,
proposal_tokens, full_vocab_probs, new_cache, config) and predicts, at draft position p of sequence b, the token the target's greedy
decode puts at position p + 2. If the step's machinery loses nothing, every step accepts a
whole path of the tree's depth.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class OracleDraft:
    def __init__(self, sequences: list[list[int]], vocab_size: int, hidden_size: int) -> None:
        longest = max(len(s) for s in sequences)
        self.table = torch.zeros(len(sequences), longest + 64, dtype=torch.int64)
        for row, seq in enumerate(sequences):
            self.table[row, : len(seq)] = torch.tensor(seq)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.config = SimpleNamespace(kind="eagle", vocab_size=vocab_size)

    def decode(self, tokens, features, positions, cache_len, tree_mask, k_cache, v_cache):
        batch, steps = tokens.shape
        hidden = torch.zeros(batch, steps, self.hidden_size, dtype=features.dtype)
        hidden[..., 0] = torch.arange(batch)[:, None].to(features.dtype)
        hidden[..., 1] = positions.to(features.dtype)
        return hidden

    def logits(self, hidden):
        rows = hidden[..., 0].long()
        target = self.table[rows, (hidden[..., 1].long() + 2).clamp(max=self.table.shape[1] - 1)]
        return torch.nn.functional.one_hot(target, self.vocab_size).to(hidden.dtype) * 10.0

    # the whole vocabulary: proposals are token ids
    proposal_logits = logits

    def proposal_tokens(self, index):
        return index

    def full_vocab_probs(self, probs):
        return probs

    def new_cache(self, batch, max_seq_len, dtype, device):
        return torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)
