"""Hedge (exponential weights) over experts, in log space, with optional optimism.

Losses are bounded in [0, 1]. Weights are ``softmax(-eta * (L + m))`` where ``L`` holds the
cumulative losses and ``m`` the optimistic hint (the last loss vector, or zero for plain
Hedge). With ``discount < 1`` the cumulative losses fade, ``L <- discount * L + loss``: the
weights then follow the best expert of roughly the last ``1 / (1 - discount)`` rounds, which is
what a drifting stream needs (plain Hedge, ``discount = 1``, competes with the best expert over
the whole history and is slow to switch after a shift). Keeping ``L`` shifted by its minimum
and normalizing with logsumexp keeps every weight finite and the sum at one over any number of
rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Hedge"]


@dataclass
class Hedge:
    n: int
    eta: float = 2.0
    optimistic: bool = False
    discount: float = 1.0

    def __post_init__(self):
        assert self.n >= 1, "Hedge needs at least one expert"
        assert self.eta >= 0, "eta must be >= 0"
        if not 0 < self.discount <= 1:
            raise ValueError("Hedge discount must be in (0, 1]")
        self.cumulative = np.zeros(self.n)  # shifted so that min == 0
        self.hint = np.zeros(self.n)
        self.rounds = 0

    @property
    def log_weights(self) -> np.ndarray:
        z = -self.eta * (self.cumulative + (self.hint if self.optimistic else 0.0))
        return z - (z.max() + math.log(np.exp(z - z.max()).sum()))

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)

    def update(self, losses) -> None:
        losses = np.asarray(losses, dtype=float)
        assert losses.shape == (self.n,), f"expected {self.n} losses, got shape {losses.shape}"
        if not np.all(np.isfinite(losses)):
            raise ValueError("Hedge losses must be finite")
        losses = np.clip(losses, 0.0, 1.0)
        self.cumulative = self.discount * self.cumulative + losses
        self.cumulative -= self.cumulative.min()  # weights depend only on differences
        self.hint = losses
        self.rounds += 1

    def state(self) -> dict:
        return {"n": self.n, "eta": self.eta, "optimistic": self.optimistic, "discount": self.discount,
                "rounds": self.rounds,
                "cumulative": self.cumulative.tolist(), "hint": self.hint.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> Hedge:
        h = cls(int(state["n"]), float(state["eta"]), bool(state["optimistic"]), float(state.get("discount", 1.0)))
        h.cumulative = np.asarray(state["cumulative"], dtype=float)
        h.hint = np.asarray(state["hint"], dtype=float)
        h.rounds = int(state["rounds"])
        return h
