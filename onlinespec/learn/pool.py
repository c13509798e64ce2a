"""Hedge over a pool of different drafters, with full information.

Every drafter in the pool is scored on every feedback record from the logged target
distributions (teacher-forced, no target forward), not only the drafter that served it. The
Hedge weights then choose which drafter serves the next requests (the heaviest one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from onlinespec.feedback import FeedbackRecord
from onlinespec.learn.batch import collate
from onlinespec.learn.forward import drafter_logits
from onlinespec.learn.hedge import Hedge
from onlinespec.learn.losses import acceptance

__all__ = ["PoolRound", "DrafterPool"]


@dataclass(frozen=True)
class PoolRound:
    round: int
    drafters: list[str]
    losses: list[float]  # tv of each drafter on the round's records, before the weights moved
    weights: list[float]
    serving: str  # the drafter chosen for the next requests

    def to_dict(self) -> dict:
        return asdict(self)


class DrafterPool:
    def __init__(self, drafters: list[str], eta: float = 4.0, optimistic: bool = True, hedge: Hedge | None = None,
                 discount: float = 1.0):
        assert drafters, "a pool needs at least one drafter"
        self.drafters = list(drafters)
        self.hedge = hedge or Hedge(len(drafters), eta, optimistic, discount)
        assert self.hedge.n == len(self.drafters), "Hedge state does not match the pool"

    @torch.no_grad()
    def score(self, models: dict[str, torch.nn.Module], records: list[FeedbackRecord], max_len: int = 1024) -> list[float]:
        batch = collate(records, max_len)
        losses = []
        for name in self.drafters:
            losses.append(float((1 - acceptance(drafter_logits(models[name], batch), batch)).mean()))
        return losses

    def round(self, models, records) -> PoolRound:
        losses = self.score(models, records)
        self.hedge.update(losses)
        w = self.hedge.weights
        return PoolRound(self.hedge.rounds, self.drafters, losses, w.tolist(), self.drafters[int(w.argmax())])
