"""A small Hugging Face causal LM as the drafter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from onlinespec.drafters.base import Proposal
from onlinespec.lm import CacheSession
from onlinespec.models import vocab_size
from onlinespec.sampling import SamplingParams, draw

__all__ = ["HFDrafter"]


@dataclass
class _State:
    session: CacheSession
    version: int


class HFDrafter:
    """Autoregressive drafting with a KV cache that is rolled back, never rebuilt, on rejection.

    ``swap(model, version)`` replaces the weights between engine steps. A request in flight
    switches to the new weights at its next ``propose`` but keeps the keys and values its cache
    already holds (computed by the previous version): re-encoding the whole prefix would stall
    the engine loop for every request at every swap, and what the drafter proposes never
    changes the output, only how much of it is accepted. New requests use the new weights only.
    """

    def __init__(self, model: PreTrainedModel, drafter_id: str, version: int = 0):
        self.model = model.eval()
        self.drafter_id = drafter_id
        self.version = version
        self.vocab_size = vocab_size(model)

    def swap(self, model: PreTrainedModel, version: int) -> None:
        self.model, self.version = model.eval(), version

    def begin(self, prompt: list[int]) -> _State:
        return _State(CacheSession(self.model), self.version)

    def next_logits(self, state: _State, tokens: list[int]) -> torch.Tensor:
        """Logits [V] for the token after ``tokens``, feeding only what the cache lacks."""
        session = state.session
        if session.model is not self.model:  # swapped: continue on the new weights, keep the cache
            session.model, state.version = self.model, self.version
        return session.feed(tokens[session.length :], last_only=True)[-1]  # at least the last token

    def propose(
        self, state: _State, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        for _ in range(k):  # each draft is fed only to draft the next: the last one is verified, not fed
            token, q = draw(self.next_logits(state, tokens + drafts), params, generator,
                            position=len(tokens) + len(drafts))
            drafts.append(token)
            if q is not None:
                qs.append(q)
        return Proposal(torch.tensor(drafts, dtype=torch.long), torch.stack(qs) if qs else None)

    def rewind(self, state: _State, keep: int) -> None:
        state.session.rewind(keep)
