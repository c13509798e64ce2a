"""Model-free prompt-lookup drafter: continue the most recent earlier occurrence of the suffix.

The request's own n-gram index of suffix speculation (:class:`onlinespec.decode.suffix.RequestIndex`)
as a :class:`~onlinespec.drafters.base.Drafter`: each draft is the continuation of the longest
suffix that occurred earlier, drafts included. Deterministic, so its ``q`` is one-hot on each
proposed token and sampling verification accepts a draft ``d`` with probability ``p(d)``.
"""

from __future__ import annotations

import torch

from onlinespec.drafters.base import Proposal
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import RequestIndex, SuffixConfig

__all__ = ["NGramDrafter"]


class NGramDrafter:
    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 1, drafter_id: str = "ngram"):
        assert 1 <= min_n <= max_n, f"need 1 <= min_n <= max_n, got {min_n}, {max_n}"
        self.vocab_size = vocab_size
        self.config = SuffixConfig(max_n=max_n, min_n=min_n, cache_min_n=min_n)
        self.drafter_id = drafter_id
        self.version = 0

    def begin(self, prompt: list[int]) -> RequestIndex:
        return RequestIndex(self.config)

    def propose(
        self, state: RequestIndex, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        state.extend(tokens)  # settled tokens only: drafts may be rejected
        found: list[int] = []
        while len(found) < k:
            match = state.lookup(tokens + found)
            if match is None:
                break
            found.append(match.token)
        return Proposal(torch.tensor(found, dtype=torch.long), None)

    def rewind(self, state: RequestIndex, keep: int) -> None:
        # Only settled tokens are ever indexed, and settled tokens are never taken back.
        pass
