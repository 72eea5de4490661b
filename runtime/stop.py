"""Stop conditions: a stop token or the token budget, per sequence."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    def __init__(self, batch: int, max_new_tokens: int, stop_ids: Sequence[int]) -> None:
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        # per sequence, the tokens each decode step gave it while still running (the step's n_out,
        # bonus included; the last step's cut short by a stop token or the budget)
        self.accept_lengths: list[list[int]] = [[] for _ in range(batch)]

    @property
    def all_done(self) -> bool:
        return all(self.done)

    @property
    def most_remaining(self) -> int:
        """The largest number of tokens a running sequence may still take (0 when all are done)."""
        return max((self.max_new_tokens - len(tokens) for tokens, done in zip(self.tokens, self.done) if not done),
                   default=0)

    @property
    def steps_taken(self) -> list[int]:
        """Decode steps each sequence used while still running."""
        return [len(lengths) for lengths in self.accept_lengths]

    @property
    def steps_used(self) -> int:
        return max(self.steps_taken, default=0)

    def extend_all(self, new_tokens: Sequence[Sequence[int]], count_step: bool = True) -> None:
        for row, new in enumerate(new_tokens):
            if self.done[row]:
                continue
            before = len(self.tokens[row])
            for token in new:
                self.tokens[row].append(token)
                if token in self.stop_ids or len(self.tokens[row]) >= self.max_new_tokens:
                    self.done[row] = True
                    break
            if count_step:
                self.accept_lengths[row].append(len(self.tokens[row]) - before)
