"""Hedge over a pool of different drafters, with full information.

Every drafter in the pool is scored on every feedback record from the logged target
distributions (teacher-forced, no target forward), not only the drafter that served it. The
Hedge weights then decide which drafter drafts for which request: the server draws each
request's drafter from the weights of its traffic group (its declared domain, else its API key:
:func:`~onlinespec.learn.estimate.group_of`; once that group has ``min_positions`` of recent
data, the whole target's weights otherwise). Hedge is a randomized
strategy, and drawing from its weights is what its regret bound is about; drafters of similar
quality share the traffic, a clearly better one takes nearly all of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from onlinespec.drafters.feature import FeatureDrafter
from onlinespec.feedback.record import FeedbackRecord
from onlinespec.learn.batch import collate
from onlinespec.learn.estimate import group_of
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
    serving: str  # the heaviest drafter overall
    group_weights: dict  # traffic group -> {drafter: weight}, groups with enough recent data only

    def to_dict(self) -> dict:
        return asdict(self)


class DrafterPool:
    def __init__(self, drafters: list[str], eta: float = 4.0, optimistic: bool = True, hedge: Hedge | None = None,
                 discount: float = 1.0, groups: dict | None = None, min_positions: float = 64.0,
                 max_groups: int = 64, group_decay: float = 0.9):
        """``groups``: kept per-group state (:meth:`group_state`); a group's weights are served
        once its decayed positions reach ``min_positions``."""
        assert drafters, "a pool needs at least one drafter"
        self.drafters = list(drafters)
        self.eta, self.optimistic, self.discount = eta, optimistic, discount
        self.hedge = hedge or Hedge(len(drafters), eta, optimistic, discount)
        assert self.hedge.n == len(self.drafters), "Hedge state does not match the pool"
        self.min_positions, self.max_groups, self.group_decay = min_positions, max_groups, group_decay
        self.groups: dict[str, tuple[Hedge, float]] = {}  # group -> (its Hedge, decayed positions)
        for g, st in (groups or {}).items():
            if int(st["hedge"]["n"]) == len(self.drafters):
                h = Hedge.from_state(st["hedge"])
                h.eta, h.discount = eta, discount
                self.groups[g] = (h, float(st["positions"]))

    @torch.no_grad()
    def position_losses(self, models: dict[str, torch.nn.Module], batch, features_batch=None) -> list[torch.Tensor]:
        """[N] per drafter: 1 - acceptance at each position of the batch (a feature drafter's on
        ``features_batch``: the same positions, each record cut where its captured features start)."""
        return [1 - acceptance(drafter_logits(models[name], b), b)
                for name in self.drafters
                for b in [features_batch if isinstance(models[name], FeatureDrafter) else batch]]

    def batches(self, models, records, max_len: int = 1024, features: list | None = None):
        """(records, batch, features batch or None): with a feature drafter in the pool, every
        drafter is scored on the records with captured ``features``, at the positions both batches
        hold (a record whose output a capture does not cover whole is left out)."""
        if features is None or not any(isinstance(m, FeatureDrafter) for m in models.values()):
            return records, collate(records, max_len), None
        batch, fbatch = collate(records, max_len), collate(records, max_len, features=features)
        a, b = (torch.bincount(x.row, minlength=len(records)) for x in (batch, fbatch))
        if not torch.equal(a, b):
            keep = [i for i in range(len(records)) if a[i] == b[i] and a[i] > 0]
            records, features = [records[i] for i in keep], [features[i] for i in keep]
            if not records:
                return [], None, None
            batch, fbatch = collate(records, max_len), collate(records, max_len, features=features)
        return records, batch, fbatch

    def score(self, models: dict[str, torch.nn.Module], records: list[FeedbackRecord], max_len: int = 1024,
              features: list | None = None) -> list[float]:
        records, batch, fbatch = self.batches(models, records, max_len, features)
        return [float(x.mean()) for x in self.position_losses(models, batch, fbatch)]

    def round(self, models, records, max_len: int = 1024, features: list | None = None) -> PoolRound | None:
        """One Hedge round on ``records`` (with a feature drafter in the pool: those with captured
        ``features``; None when none of them can be scored)."""
        records, batch, fbatch = self.batches(models, records, max_len, features)
        if batch is None:
            return None
        per = self.position_losses(models, batch, fbatch)
        losses = [float(x.mean()) for x in per]
        self.hedge.update(losses)
        groups = [group_of(r.tenant, r.domain) for r in records]
        at = [groups[i] for i in batch.row.tolist()]
        self.groups = {g: (h, n * self.group_decay) for g, (h, n) in self.groups.items()}
        for g in sorted({x for x in at if x is not None}):
            mask = torch.tensor([x == g for x in at])
            hedge, n = self.groups.get(g) or (Hedge(len(self.drafters), self.eta, self.optimistic, self.discount), 0.0)
            hedge.update([float(x[mask].mean()) for x in per])
            self.groups[g] = (hedge, n + float(mask.sum()))
        if len(self.groups) > self.max_groups:
            keep = sorted(self.groups, key=lambda g: -self.groups[g][1])[: self.max_groups]
            self.groups = {g: self.groups[g] for g in keep}
        w = self.hedge.weights
        return PoolRound(self.hedge.rounds, self.drafters, losses, w.tolist(), self.drafters[int(w.argmax())],
                         self.group_weights())

    def group_weights(self) -> dict[str, dict[str, float]]:
        return {g: dict(zip(self.drafters, h.weights.tolist())) for g, (h, n) in self.groups.items()
                if n >= self.min_positions}

    def group_state(self) -> dict:
        return {g: {"hedge": h.state(), "positions": n} for g, (h, n) in self.groups.items()}
