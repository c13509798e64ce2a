"""Model-free prompt-lookup drafter: continue the most recent earlier occurrence of the suffix.

Deterministic, so its ``q`` is one-hot on each proposed token and sampling verification
accepts a draft ``d`` with probability ``p(d)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onlinespec.drafters.base import Proposal
from onlinespec.sampling import SamplingParams

__all__ = ["NGramDrafter"]


@dataclass
class _State:
    # n-gram (as a tuple) -> position right after its most recent occurrence
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # positions p < indexed have had their n-grams ending at p added


class NGramDrafter:
    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 1, drafter_id: str = "ngram"):
        assert 1 <= min_n <= max_n, f"need 1 <= min_n <= max_n, got {min_n}, {max_n}"
        self.vocab_size = vocab_size
        self.max_n, self.min_n = max_n, min_n
        self.drafter_id = drafter_id
        self.version = 0

    def begin(self, prompt: list[int]) -> _State:
        return _State()

    def _index(self, state: _State, tokens: list[int]) -> None:
        # Index continuations at positions p <= len - 1, so a match always has a next token.
        for p in range(max(state.indexed, 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                state.index[tuple(tokens[p - n : p])] = p
        state.indexed = max(state.indexed, len(tokens))

    def propose(
        self, state: _State, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        # Positions p <= len - 1 are indexed; the suffix itself (continuation at len) never is.
        self._index(state, tokens)
        found: list[int] = []
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            p = state.index.get(tuple(tokens[-n:]))
            if p is not None:
                found = tokens[p : p + k]
                break
        return Proposal(torch.tensor(found, dtype=torch.long), None)

    def rewind(self, state: _State, keep: int) -> None:
        # Only settled tokens are ever indexed, and settled tokens are never taken back.
        pass
