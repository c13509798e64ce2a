"""The draft length of a vLLM step, and whether the drafter model drafts in it, chosen from the
throughput each choice measured at this batch size.

vLLM gives a custom proposer no cost model and no view of the target's step time, but the proposer
is called once per engine step: the time from one call to the next is what a step cost, drafting
included, and the tokens the rows emitted at the next call are what it yielded. :class:`StepK`
keeps, per batch-size bucket, draft length ``k`` (0 = plain decoding) and source, a running mean of
both, and drafts each step with the choice whose tokens per second are highest where the batch is
now. The source: suffix copies always (they cost no forward), the drafter model on the rows nothing
copies for, or not: a weak drafter is muted while the copies go on (a step where no row needed the
drafter counts as one without it).
A length not yet tried at a bucket is tried first; afterwards a small share of steps
(``explore``) tries another one, so a drafter that improves (a new version) or a batch that
grows is noticed. ``k = 0`` when speculation measured slower: the engine is then plain vLLM
decoding, at the cost of the exploring steps.
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
        # (k, drafter model on); k = 0 drafts nothing either way
        self.choices = [(0, False)] + [(k, m) for k in range(1, k_max + 1) for m in (False, True)]
        self.explore = explore
        self.min_steps = min_steps  # steps each length is measured before the others are compared with it
        self.decay = decay
        self.arms: dict[tuple[int, int], _Arm] = {}
        self.rng = random.Random(seed)
        self.chosen: dict[int, int] = {}  # k -> steps that drafted with it
        self.modelled = 0  # steps where the drafter model was on

    def observe(self, batch: int, k: int, modelled: bool, seconds: float, tokens: int) -> None:
        """A step of ``batch`` rows with draft length ``k`` (``modelled``: the drafter model drafted
        in it) took ``seconds`` and emitted ``tokens``."""
        if seconds <= 0 or batch <= 0:
            return
        arm = self.arms.setdefault((bucket(batch), k, modelled and k > 0), _Arm())
        if arm.n >= self.min_steps and seconds > 4 * arm.seconds:
            return  # an idle gap between requests (or a stall), not what this length costs
        arm.observe(seconds, tokens, self.decay)

    def choose(self, batch: int, modelled: bool = True) -> tuple[int, bool]:
        """(k, drafter model on) for a step of ``batch`` rows; ``modelled``: some row would draft
        with its drafter model (else only the choices without it are weighed)."""
        b = bucket(batch)
        choices = [c for c in self.choices if modelled or not c[1]]
        untried = [c for c in choices if self.arms.get((b, *c), _Arm()).n < self.min_steps]
        if untried:
            choice = untried[0]
        elif self.rng.random() < self.explore:
            choice = self.rng.choice(choices)
        else:
            choice = max(choices, key=lambda c: self.arms[(b, *c)].rate)
        self.chosen[choice[0]] = self.chosen.get(choice[0], 0) + 1
        if choice[1]:
            self.modelled += 1
        return choice

    def rates(self) -> dict[str, float]:
        """Measured tokens/s per ``"batch bucket/k/model"``: what the choice rests on."""
        return {f"{b}/{k}/{'model' if m else 'copies'}": arm.rate for (b, k, m), arm in sorted(self.arms.items())}
