"""The drafter contract: propose up to ``k`` tokens, then rewind to what the target accepted.

A drafter holds weights (shared by every request, hot-swappable) and hands out per-request
state (its caches). The engine orchestrates; learners never live inside a drafter. Hugging Face
drafters (:class:`onlinespec.drafters.hf.HFDrafter`) are not driven through this contract: a
batch drafts for all of their requests at once (:class:`onlinespec.decode.proposers.DraftRows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from onlinespec.decode.sampling import SamplingParams

__all__ = ["Proposal", "Drafter"]


@dataclass(frozen=True)
class Proposal:
    """What a drafter proposes for one step.

    tokens: [m] int64 with 0 <= m <= k (a drafter may propose fewer, or none).
    q: [m, V] the processed distributions the tokens were drawn from, or None when the
       drafter is deterministic (q is one-hot on each proposed token).
    """

    tokens: torch.Tensor
    q: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.tokens.numel())


@runtime_checkable
class Drafter(Protocol):
    drafter_id: str
    version: int
    vocab_size: int

    def begin(self, prompt: list[int]) -> object:
        """Per-request state for a new sequence (nothing is encoded until the first propose)."""

    def propose(
        self, state: object, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        """Up to ``k`` tokens to follow ``tokens`` (the whole sequence so far). Sampled drafts go
        through :func:`onlinespec.decode.sampling.draw` with ``generator`` (a seeded request's
        :class:`~onlinespec.decode.sampling.PositionNoise`) and the draft's position in the sequence."""

    def rewind(self, state: object, keep: int) -> None:
        """The sequence now has its first ``keep`` tokens settled; forget drafted tokens past them."""
