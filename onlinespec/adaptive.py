"""Choosing the draft length ``k`` from measured acceptance and cost.

With a per-token acceptance rate ``a`` (drafts accepted independently, the usual model), a
block of ``k`` drafts yields ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation. A step costs
``k * t_draft + t_verify(k)``, while plain target decoding costs ``t_plain`` a token, so

    speedup(k) = tokens(k) * t_plain / (k * t_draft + t_verify(k)),   t_verify(k) = t_plain + v * k

(``v``: the measured extra cost of each verified position). The controller picks the ``k`` in
``[k_min, k_max]`` that maximizes it; when no ``k`` beats plain decoding it decodes plainly and
probes again every ``probe_every`` steps so it notices when the drafter has improved.
All estimates are exponentially weighted, so they follow a drifting drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AdaptiveK", "expected_tokens", "theoretical_speedup"]


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens per step (accepted drafts + the target's token) at acceptance rate a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def theoretical_speedup(a: float, k: int, c: float) -> float:
    """Leviathan et al.'s ``(1 - a^(k+1)) / ((1 - a)(k c + 1))``: verification assumed as cheap
    as one target token, ``c`` = drafter cost / target cost per token."""
    return expected_tokens(a, k) / (k * c + 1.0)


@dataclass
class AdaptiveK:
    k_min: int = 1
    k_max: int = 8
    decay: float = 0.98  # per step: the estimates follow about the last 50 steps
    prior_accept: float = 0.6
    probe_every: int = 32
    min_speedup: float = 1.0

    def __post_init__(self):
        assert 1 <= self.k_min <= self.k_max, f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}"
        # Acceptance as decayed counts of accepted drafts and of rejections (a truncated geometric).
        self.accepted = 2.0 * self.prior_accept
        self.rejected = 2.0 * (1.0 - self.prior_accept)
        self.t_plain: float | None = None  # seconds per plain target step
        self.t_draft: float | None = None  # seconds per drafted token
        self.v: float = 0.0  # extra verify seconds per drafted position
        self.plain_streak = 0
        self.steps = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def cost_ratio(self) -> float | None:
        if self.t_plain is None or self.t_draft is None:
            return None
        return self.t_draft / self.t_plain

    def speedup(self, k: int) -> float:
        if self.t_plain is None or self.t_draft is None:
            return float("inf")  # unmeasured: speculate to learn the costs
        step = k * self.t_draft + self.t_plain + self.v * k
        return expected_tokens(self.acceptance, k) * self.t_plain / step

    def best_k(self) -> int:
        return max(range(self.k_min, self.k_max + 1), key=self.speedup)

    def choose(self) -> int:
        """Draft length for the next step; 0 means one plain target step."""
        if self.t_plain is None:
            return 0  # measure plain decoding once first
        k = self.best_k()
        if self.speedup(k) >= self.min_speedup:
            return k
        if self.plain_streak >= self.probe_every:
            return k  # probe: one speculative step refreshes the acceptance estimate
        return 0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def observe_plain(self, seconds: float) -> None:
        self.t_plain = self._ema(self.t_plain, seconds)
        self.plain_streak += 1

    def observe_spec(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.plain_streak = 0
        if drafted == 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < drafted else 0.0)
        self.t_draft = self._ema(self.t_draft, draft_seconds / drafted)
        if self.t_plain is not None:
            self.v = self._ema(self.v, max(0.0, verify_seconds - self.t_plain) / drafted)
