"""How many tokens the drafter model drafts in a vLLM step (0: muted), chosen from what a step costs
at this batch size and what the drafter's drafts are worth.

vLLM gives a custom proposer no cost model and no view of the target's step time, but the proposer
is called once per engine step: the time from one call to the next is what a step cost, its
drafting included, and the proposer knows how many draft tokens it handed vLLM to verify and how
long its drafter forwards took. :class:`StepK` keeps, per batch-size bucket,

- a line through the step times without the drafter's own time, against the draft tokens
  verified: ``base + verify * drafts`` (running moments; the copies' varying lengths give it the
  spread it needs, so it is learned while the drafter is muted too);
- the drafter's forward time per draft position;
- the tokens the other rows (copying, or with nothing to draft) emit per step;

and, over all steps where the drafter drafted, its per-position acceptance ``p`` (positions it
reached and the share accepted). A step with ``c`` copied tokens and ``n`` rows that would draft
with the model is predicted to emit ``others + n (1 + p + ... + p^k)`` tokens in ``base + verify
(c + n k) + forward k`` seconds, and the length with the most tokens per second drafts. Measuring
tokens per second per length directly, as this did before, let the copies' variance pick the
drafter's length.

Only the drafter model's length is chosen: suffix copies go at full length wherever they match
(as vLLM's own n-gram and suffix proposers do; they cost no forward), and a step whose rows only
copy, or draft nothing, is not a choice (it still teaches the cost line). A weak drafter is muted
(``k = 0``) while the copies go on. Until the drafter has drafted a few steps at a bucket every
length is tried; afterwards a small share of steps (``explore``) tries another one, so that a
drafter that improves (a new version) is seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["StepK", "bucket"]


def bucket(batch: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or above ``batch``."""
    b = 1
    while b < batch:
        b *= 2
    return b


@dataclass
class _Mean:
    value: float = 0.0  # a running mean over recent observations
    n: int = 0

    def add(self, x: float, decay: float) -> None:
        w = 1.0 / (self.n + 1) if self.n < 1 / (1 - decay) else 1 - decay
        self.value += w * (x - self.value)
        self.n += 1


class _Line:
    """``y = base + slope * x`` from decayed moments of recent (x, y)."""

    def __init__(self, decay: float):
        self.decay, self.w, self.x, self.y, self.xx, self.xy = decay, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + x, d * self.y + y
        self.xx, self.xy = d * self.xx + x * x, d * self.xy + x * y

    def at(self, x: float) -> float:
        if self.w == 0:
            return 0.0
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        slope = max(0.0, (self.xy / self.w - mx * my) / var) if var > 1e-9 else 0.0
        return my + slope * (x - mx)


class StepK:
    def __init__(self, k_max: int, explore: float = 0.03, min_steps: int = 3, decay: float = 0.97,
                 seed: int = 0, prior: float = 0.3):
        self.choices = list(range(k_max + 1))  # the drafter model's length; 0: muted
        self.explore = explore
        self.min_steps = min_steps  # drafting steps a bucket needs before the model is trusted
        self.decay = decay
        self.cost: dict[int, _Line] = {}  # bucket -> step seconds (drafter's own time left out) by drafts verified
        self.forward: dict[int, _Mean] = {}  # bucket -> drafter seconds per draft position
        self.others: dict[int, _Mean] = {}  # bucket -> tokens a step from the rows not drafting with the model
        self.reached, self.hits = 2.0, 2.0 * prior  # drafter positions reached / accepted (decayed counts)
        self.rng = random.Random(seed)
        self.chosen: dict[int, int] = {}  # k -> steps that chose it
        self.modelled = 0  # steps where the drafter model drafted (k > 0)

    @property
    def acceptance(self) -> float:
        """The drafter's per-position acceptance, as its recent drafts measured it."""
        return self.hits / self.reached

    def observe(self, batch: int, k: int, seconds: float, other_tokens: int, blocks=(), drafts: int = 0,
                drafter_seconds: float = 0.0) -> None:
        """A step of ``batch`` rows took ``seconds``, of which the drafter model's forwards
        ``drafter_seconds`` (``k`` positions; 0: muted), with ``drafts`` draft tokens for vLLM to
        verify (copies and the model's); the rows that did not draft with the model emitted
        ``other_tokens`` (None: the step was not a choice); ``blocks``: (drafted, accepted) of each
        row the model drafted for."""
        if seconds <= 0 or batch <= 0:
            return
        b = bucket(batch)
        line = self.cost.setdefault(b, _Line(self.decay))
        rest = seconds - drafter_seconds
        if line.w >= self.min_steps and rest > 4 * line.at(drafts):
            return  # an idle gap between requests (or a prefill, a stall), not what drafts cost
        line.add(drafts, rest)
        if k > 0 and drafter_seconds > 0:
            self.forward.setdefault(b, _Mean()).add(drafter_seconds / k, self.decay)
        if other_tokens is not None:
            self.others.setdefault(b, _Mean()).add(other_tokens, self.decay)
        for drafted, accepted in blocks:
            if drafted:  # a rejection ends the block: the positions after it were not reached
                self.reached = self.reached * 0.99 + accepted + (accepted < drafted)
                self.hits = self.hits * 0.99 + accepted

    def predicted(self, batch: int, rows: int, copied: int = 0) -> dict[int, float]:
        """Tokens per second each length would give a step of ``batch`` rows with ``copied``
        copied draft tokens, ``rows`` of which would draft with the model ({} until measured)."""
        b, p = bucket(batch), self.acceptance
        if b not in self.cost or b not in self.forward:
            return {}
        others = self.others[b].value if b in self.others else 0.0
        line, forward = self.cost[b], self.forward[b].value
        out = {}
        for k in self.choices:
            seconds = line.at(copied + rows * k) + forward * k
            if seconds > 0:
                out[k] = (others + rows * sum(p ** i for i in range(k + 1))) / seconds
        return out

    def choose(self, batch: int, rows: int = 1, copied: int = 0) -> int:
        """The drafter model's length for a step of ``batch`` rows, ``rows`` of which would draft
        with it, the others copying ``copied`` draft tokens."""
        b = bucket(batch)
        rates = self.predicted(batch, rows, copied) if self.forward.get(b, _Mean()).n >= self.min_steps else {}
        if not rates:
            k = self.choices[1 + self.forward.get(b, _Mean()).n % (len(self.choices) - 1)] if len(self.choices) > 1 else 0
        elif self.rng.random() < self.explore:
            k = self.rng.choice(self.choices)
        else:
            k = max(rates, key=rates.get)
        self.chosen[k] = self.chosen.get(k, 0) + 1
        self.modelled += k > 0
        return k

    def rates(self) -> dict[str, float]:
        """Predicted tokens/s per ``"batch bucket/k"`` for one drafting row: what the choice rests on."""
        return {f"{b}/{k}": r for b in sorted(self.cost) for k, r in self.predicted(b, 1).items()}
