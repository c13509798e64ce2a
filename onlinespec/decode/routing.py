"""Which drafter drafts for a request: drawn from the pool's Hedge weights.

The pool's learners (:mod:`onlinespec.learn.pool`) keep Hedge weights over the drafters, for the
whole target and for each traffic group with enough recent data (a request's
``metadata.domain``, else its API key: :func:`~onlinespec.learn.estimate.group_of`). Each request's drafter is drawn from its group's
weights (the whole target's when its group has none), mixed with a uniform share ``explore``:
every drafter keeps drafting for a bounded share of the requests, so what the server measures of
it stays current even when its weight is small. Requests of one batch may have different
drafters; each drafter drafts for its rows in one forward per position.
"""

from __future__ import annotations

import random
import threading

__all__ = ["DrafterRouter"]


class DrafterRouter:
    def __init__(self, drafters: list[str], explore: float = 0.05, seed: int | None = None):
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.drafters = list(drafters)
        self.explore = explore
        self.weights: dict[str, float] = {}  # the whole target's; empty: uniform
        self.group_weights: dict[str, dict[str, float]] = {}
        self.rng = random.Random(seed)
        self._lock = threading.Lock()

    def update(self, weights: dict[str, float] | None, group_weights: dict[str, dict[str, float]] | None) -> None:
        """New weights from the pool (drafters this server does not serve are ignored)."""
        with self._lock:
            if weights is not None:
                self.weights = {d: float(w) for d, w in weights.items() if d in self.drafters}
            if group_weights is not None:
                self.group_weights = {g: {d: float(w) for d, w in ws.items() if d in self.drafters}
                                      for g, ws in group_weights.items()}

    def probabilities(self, group: str | None = None) -> dict[str, float]:
        """The chance of each drafter for a request of traffic ``group`` (:func:`group_of`)."""
        with self._lock:
            weights = self.group_weights.get(group) or self.weights
        n = len(self.drafters)
        total = sum(max(0.0, weights.get(d, 0.0)) for d in self.drafters)
        if total <= 0:
            return {d: 1.0 / n for d in self.drafters}
        return {d: (1 - self.explore) * max(0.0, weights.get(d, 0.0)) / total + self.explore / n
                for d in self.drafters}

    def pick(self, group: str | None = None) -> str | None:
        if not self.drafters:
            return None
        if len(self.drafters) == 1:
            return self.drafters[0]
        probs = self.probabilities(group)
        with self._lock:
            return self.rng.choices(self.drafters, weights=[probs[d] for d in self.drafters])[0]

    def heaviest(self) -> str | None:
        """The drafter with the largest overall weight (the first one before the pool has run)."""
        if not self.drafters:
            return None
        probs = self.probabilities()
        return max(self.drafters, key=lambda d: probs[d])
