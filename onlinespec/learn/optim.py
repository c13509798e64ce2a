"""Online gradient updates with optional optimism, river-style: ``play`` then ``step``.

The learner keeps a base iterate ``w``. Each round it *plays* (serves) ``w - lr * P(h)``, where
``h`` is a hint of the next gradient built from past gradients (``none``: plain OGD; ``last``:
the previous gradient; ``ema``: an exponential average), and ``P`` is the preconditioner
(identity, or a diagonal of past squared gradients for the adaptive variant, whose state
persists across rounds: their sum, AdaGrad, with ``sq_decay = 1``; an exponential average,
RMSProp-style with bias correction, with ``sq_decay < 1``, whose step sizes do not shrink over
a long stream and so keep tracking after a shift).
When the round's gradient ``g`` (taken at the played point) arrives: ``w <- w - lr * P(g)``.
With good hints optimistic OGD's regret scales with sum ||g_t - h_t||^2 instead of sum ||g_t||^2.

State is a dict of named tensors plus a few numbers, saved with each published version, so any
worker can continue from any version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["OptimConfig", "OnlineOptimizer"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    hint: str = "none"  # "none" (OGD) | "last" | "ema"
    hint_weight: float = 1.0  # scales the hint: 0 turns optimism off
    hint_decay: float = 0.9  # for "ema"
    adaptive: bool = False  # diagonal preconditioner, state kept across rounds
    sq_decay: float = 1.0  # 1: AdaGrad (sum of squared gradients); < 1: their exponential average
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # 0: no clipping

    def __post_init__(self):
        if self.lr < 0:
            raise ValueError("lr must be >= 0")
        if self.hint not in ("none", "last", "ema"):
            raise ValueError(f"hint must be none, last or ema, got {self.hint!r}")
        if not 0 <= self.hint_decay < 1:
            raise ValueError("hint_decay must be in [0, 1)")
        if not 0 < self.sq_decay <= 1:
            raise ValueError("sq_decay must be in (0, 1]")

    def as_dict(self) -> dict:
        return asdict(self)


class OnlineOptimizer:
    def __init__(self, params: Params, config: OptimConfig):
        self.config = config
        self.w = {k: v.detach().clone().float() for k, v in params.items()}
        self.hint: Params = {}
        self.sq: Params = {}  # AdaGrad accumulators
        self.rounds = 0

    def _precondition(self, name: str, g: torch.Tensor, updates: int) -> torch.Tensor:
        """``g`` scaled by the diagonal preconditioner after ``updates`` squared-gradient updates."""
        c = self.config
        if not c.adaptive:
            return g
        if name not in self.sq:
            return torch.zeros_like(g)
        sq = self.sq[name] if c.sq_decay == 1 else self.sq[name] / (1 - c.sq_decay ** updates)
        return g / (sq.sqrt() + c.eps)

    def play(self) -> Params:
        """Parameters to serve this round: the base iterate moved along the hint."""
        c = self.config
        if c.hint == "none" or not self.hint or c.hint_weight == 0:
            return {k: v.clone() for k, v in self.w.items()}
        return {
            k: v - c.lr * c.hint_weight * self._precondition(k, self.hint[k], self.rounds) if k in self.hint else v.clone()
            for k, v in self.w.items()
        }

    def step(self, grads: Params) -> None:
        """The round's gradient, taken at the played point."""
        c = self.config
        if c.max_grad_norm > 0:
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
            if norm > c.max_grad_norm:
                grads = {k: g * (c.max_grad_norm / norm) for k, g in grads.items()}
        for k, g in grads.items():
            g = g.float()
            if c.adaptive:
                sq = self.sq.get(k, torch.zeros_like(g))
                self.sq[k] = sq + g * g if c.sq_decay == 1 else c.sq_decay * sq + (1 - c.sq_decay) * g * g
            self.w[k] -= c.lr * self._precondition(k, g, self.rounds + 1)
            if c.hint == "last":
                self.hint[k] = g.clone()
            elif c.hint == "ema":
                self.hint[k] = c.hint_decay * self.hint[k] + (1 - c.hint_decay) * g if k in self.hint else g.clone()
        self.rounds += 1

    def state_tensors(self) -> Params:
        out = {f"w/{k}": v for k, v in self.w.items()}
        out.update({f"hint/{k}": v for k, v in self.hint.items()})
        out.update({f"sq/{k}": v for k, v in self.sq.items()})
        return out

    def load_state_tensors(self, tensors: Params, rounds: int) -> None:
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            {"w": self.w, "hint": self.hint, "sq": self.sq}[kind][name] = value.float().clone()
        self.rounds = rounds
