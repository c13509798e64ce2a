"""How many tokens the drafter model drafts in a vLLM step (0: muted), chosen from the throughput
each length measured at this batch size.

vLLM gives a custom proposer no cost model and no view of the target's step time, but the proposer
is called once per engine step: the time from one call to the next is what a step cost, drafting
included, and the tokens the rows emitted at the next call are what it yielded. :class:`StepK`
keeps, per batch-size bucket and drafter length ``k``, a running mean of both, and drafts each
step with the length whose tokens per second are highest where the batch is now.

Only the drafter model's length is chosen: suffix copies go at full length wherever they match
(as vLLM's own n-gram and suffix proposers do; they cost no forward, and a step whose rows only
copy, or draft nothing, is not a choice and is not measured). A weak drafter is muted (``k = 0``)
while the copies go on; where nothing copies either, the engine is then plain vLLM decoding.
A length not yet tried at a bucket is tried first; afterwards a small share of steps
(``explore``) tries another one, so a drafter that improves (a new version) or a batch that
grows is noticed.
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
class _Arm:
    seconds: float = 0.0  # running means over recent steps
    tokens: float = 0.0
    n: int = 0

    def observe(self, seconds: float, tokens: int, decay: float) -> None:
        w = 1.0 / (self.n + 1) if self.n < 1 / (1 - decay) else 1 - decay
        self.seconds += w * (seconds - self.seconds)
        self.tokens += w * (tokens - self.tokens)
        self.n += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class StepK:
    def __init__(self, k_max: int, explore: float = 0.05, min_steps: int = 3, decay: float = 0.95,
                 seed: int = 0):
        self.choices = list(range(k_max + 1))  # the drafter model's length; 0: muted
        self.explore = explore
        self.min_steps = min_steps  # steps each length is measured before the others are compared with it
        self.decay = decay
        self.arms: dict[tuple[int, int], _Arm] = {}
        self.rng = random.Random(seed)
        self.chosen: dict[int, int] = {}  # k -> steps that chose it
        self.modelled = 0  # steps where the drafter model drafted (k > 0)

    def observe(self, batch: int, k: int, seconds: float, tokens: int) -> None:
        """A step of ``batch`` rows whose drafter model drafted ``k`` tokens (0: muted) took
        ``seconds`` and emitted ``tokens``."""
        if seconds <= 0 or batch <= 0:
            return
        arm = self.arms.setdefault((bucket(batch), k), _Arm())
        if arm.n >= self.min_steps and seconds > 4 * arm.seconds:
            return  # an idle gap between requests (or a stall), not what this length costs
        arm.observe(seconds, tokens, self.decay)

    def choose(self, batch: int) -> int:
        """The drafter model's length for a step of ``batch`` rows (some of which would draft with it)."""
        b = bucket(batch)
        untried = [k for k in self.choices if self.arms.get((b, k), _Arm()).n < self.min_steps]
        if untried:
            k = untried[0]
        elif self.rng.random() < self.explore:
            k = self.rng.choice(self.choices)
        else:
            k = max(self.choices, key=lambda c: self.arms[(b, c)].rate)
        self.chosen[k] = self.chosen.get(k, 0) + 1
        self.modelled += k > 0
        return k

    def rates(self) -> dict[str, float]:
        """Measured tokens/s per ``"batch bucket/k"``: what the choice rests on."""
        return {f"{b}/{k}": arm.rate for (b, k), arm in sorted(self.arms.items())}
