"""Choosing the draft length ``k`` from measured acceptance and cost.

With a per-token acceptance rate ``a`` (drafts accepted independently, the usual model), a
block of ``k`` drafts yields ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation. A step costs
``k * t_draft + t_verify(k)``, while plain target decoding costs ``t_plain`` a token, so

    speedup(k) = tokens(k) * t_plain / (k * t_draft + t_verify(k)),   t_verify(k) = t_plain + v * k

(``v``: the measured extra cost of each verified position). The controller picks the ``k`` in
``[k_min, k_max]`` that maximizes it; when no ``k`` beats plain decoding it decodes plainly and
probes again every ``probe_every`` steps so it notices when the drafter has improved.
All estimates are exponentially weighted, so they follow a drifting drafter.

Under batching (:class:`BatchK`) the same rule runs per batch size: a step of ``B`` rows costs
``t_plain(B)`` plain and ``k * t_draft(B) + t_plain(B) + v(B) * k + t_join(B)`` with drafts, every
row expecting ``tokens(k)`` at its proposer's acceptance, so ``k = 0`` (plain batched decoding)
wins wherever verifying ``B x (k+1)`` positions costs more than the drafts bring. The costs are
what the batch measures, not what the forwards alone take: verification includes accepting and
rewinding every row, and ``t_join`` is the drafters' encoding of rows new to them (under load
requests come and go, and each is encoded once). A probe that keeps saying "plain" doubles the
wait before the next one (``max_backoff``), since under load a probe costs a slow step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["AdaptiveK", "BatchK", "SUFFIX", "expected_tokens", "theoretical_speedup"]

SUFFIX = "__suffix__"  # the acceptance of suffix copies, whichever row they drafted for


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens per step (accepted drafts + the target's token) at acceptance rate a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def theoretical_speedup(a: float, k: int, c: float, v: float = 1.0) -> float:
    """``(1 - a^(k+1)) / ((1 - a)(k c + v))``: ``c`` = drafter cost / target cost per token,
    ``v`` = the cost of verifying k+1 tokens in target steps. Leviathan et al.'s bound is
    ``v = 1`` (verification as cheap as one token: a GPU); a CPU measures more."""
    return expected_tokens(a, k) / (k * c + v)


@dataclass
class AdaptiveK:
    k_min: int = 1
    k_max: int = 8
    decay: float = 0.98  # per step: the estimates follow about the last 50 steps
    prior_accept: float = 0.6
    probe_every: int = 32
    min_speedup: float = 1.0
    # a probe that did not show speculation paying doubles the wait before the next one, up to
    # probe_every x max_backoff plain steps (a probe under load costs a slow step and the
    # drafter encoding every row it has not seen)
    max_backoff: int = 8
    # after this many speculative steps in a row, one plain step refreshes t_plain (0: never);
    # every other cost is measured against it
    plain_every: int = 0

    def __post_init__(self):
        assert 1 <= self.k_min <= self.k_max, f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}"
        # Acceptance as decayed counts of accepted drafts and of rejections (a truncated geometric).
        self.accepted = 2.0 * self.prior_accept
        self.rejected = 2.0 * (1.0 - self.prior_accept)
        self.t_plain: float | None = None  # seconds per plain target step
        self.t_draft: float | None = None  # seconds per drafted token
        self.v: float = 0.0  # extra verify seconds per drafted position
        self.plain_streak = 0
        self.spec_streak = 0
        self.steps = 0
        self.backoff = 1  # the probe interval's multiplier
        self.probing = False  # whether the last choice was a probe
        # drafter seconds per speculative step spent encoding rows it had not drafted for: under
        # load requests come and go and each is encoded once, a cost every speculative step
        # shares (from 0, not from the first step, whose rows all join at once)
        self.t_join = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def cost_ratio(self) -> float | None:
        if self.t_plain is None or self.t_draft is None:
            return None
        return self.t_draft / self.t_plain

    def step_seconds(self, k: int) -> float:
        """What a step drafting ``k`` costs, as measured (both costs must be measured)."""
        return k * self.t_draft + self.t_plain + self.v * k + self.t_join

    def speedup(self, k: int, acceptance: float | None = None) -> float:
        if self.t_plain is None or self.t_draft is None:
            return float("inf")  # unmeasured: speculate to learn the costs
        a = self.acceptance if acceptance is None else acceptance
        return expected_tokens(a, k) * self.t_plain / self.step_seconds(k)

    def best_k(self, acceptance: float | None = None) -> int:
        return max(range(self.k_min, self.k_max + 1), key=lambda k: self.speedup(k, acceptance))

    def choose(self, acceptance: float | None = None, explore: float | None = None) -> int:
        """Draft length for the next step; 0 means one plain target step. ``acceptance``: the
        one to assume (default: this controller's own estimate); ``explore``: an acceptance
        drawn from its posterior. Where the estimate says plain but the draw says speculation
        would pay, the step speculates at the draw's best ``k``: an estimate made of a few
        unlucky blocks (a cold start) is tried again soon, a confident one rarely."""
        if self.t_plain is None:
            return 0  # measure plain decoding once first
        self.probing = False
        k = self.best_k(acceptance)
        if self.speedup(k, acceptance) >= self.min_speedup:
            if self.plain_every and self.spec_streak >= self.plain_every:
                return 0
            return k
        if explore is not None:
            drawn = self.best_k(explore)
            if self.speedup(drawn, explore) >= self.min_speedup:
                return drawn
        if self.plain_streak >= self.probe_every * self.backoff:
            self.probing = True  # one speculative step refreshes the estimates
            return k
        return 0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def _cost(self, old: float | None, new: float) -> float:
        """A timing's moving average that one slow step (a cache growing, a collection, another
        process) moves by at most as much as a step twice the estimate: plain steps are rare
        while speculating, and one outlier among them used to double the plain cost for tens
        of steps, making every verification look free."""
        return new if old is None else self._ema(old, min(new, 2.0 * old))

    def observe_plain(self, seconds: float) -> None:
        self.t_plain = self._cost(self.t_plain, seconds)
        self.plain_streak += 1
        self.spec_streak = 0

    def observe_spec(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.plain_streak = 0
        if drafted == 0:
            return
        self.observe_acceptance(drafted, accepted)
        self.observe_costs(drafted, draft_seconds, verify_seconds)

    def observe_acceptance(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.observe_counts(accepted, 1.0 if accepted < drafted else 0.0)

    def observe_counts(self, accepted: float, rejections: float) -> None:
        """One step's accepted drafts and rejections (summed over the rows of a batch: the
        estimate decays per step, not per row)."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + rejections

    def observe_costs(self, drafted: int, draft_seconds: float, verify_seconds: float,
                      join_seconds: float = 0.0) -> None:
        """A step that drafted ``drafted`` positions (and verified ``drafted + 1``), after
        ``join_seconds`` of encoding rows the drafter joined (not in ``draft_seconds``). A probe
        (the last choice) that is observed doubles the wait before the next one; a step chosen
        on its merit resets it."""
        self.plain_streak = 0
        self.spec_streak += 1
        self.backoff = min(2 * self.backoff, self.max_backoff) if self.probing else 1
        if drafted == 0:
            return
        self.t_join = self._ema(self.t_join, join_seconds)
        self.t_draft = self._cost(self.t_draft, draft_seconds / drafted)
        if self.t_plain is not None:
            expected = self.t_plain + self.v * drafted
            verify_seconds = min(verify_seconds, 2.0 * expected) if self.v else verify_seconds
            self.v = self._ema(self.v, max(0.0, verify_seconds - self.t_plain) / drafted)


class BatchK:
    """The draft length of a batch step: costs measured per batch size (one :class:`AdaptiveK`
    each, probing included), acceptance per source of drafts: each drafter's own drafts (by
    drafter id) and suffix copies (:data:`SUFFIX`), each counted only on the positions it drafted.

    The batch's draft length is chosen on each row's block acceptance (copies and drafts
    together, per drafter: :meth:`rows_key`); each drafter's own acceptance decides whether it
    drafts at all in a step (:meth:`drafts_pay`).

    A new drafter version starts from the acceptance its learners estimated on recent traffic
    without drafting (:meth:`start_version`; :mod:`onlinespec.learn.estimate`) and is refined by
    the drafts it serves. Whether a drafter drafts in a step (:meth:`drafts_pay`) is decided, with
    ``thompson``, on a draw from its Beta posterior: a drafter whose estimate is uncertain near
    break-even is still tried now and then (bounded: a confident estimate is rarely overturned),
    and one that degrades is muted within a few steps. The batch's draft length uses the means;
    where they say plain, a draw of the blocks' acceptance from the posteriors of the sources
    known from few blocks may still say speculate (exploration in proportion to doubt: a cold
    start whose first few blocks were unlucky used to lock a level into plain decoding, a 1.3x
    loss at one user in half the runs).
    """

    def __init__(self, k_max: int = 8, cost_decay: float = 0.95, plain_every: int = 32, probe_every: int = 8,
                 thompson: bool = True, prior_weight: float = 20.0, seed: int = 0, min_speedup: float = 1.0,
                 **kw):
        """Costs follow the last ~20 steps at each batch size (``cost_decay``; a shared machine's
        timings drift); a plain step every ``plain_every`` speculative ones keeps the plain
        cost, which every other cost is measured against, fresh. ``prior_weight``: the drafts a
        version's published estimate counts as (a few steps of a batch). ``min_speedup``: the
        predicted gain a speculative step must show (the model of a step is approximate: at
        break-even, plain decoding is the safe side)."""
        self.k_max, self.kw = k_max, kw
        self.cost_kw = {**kw, "decay": cost_decay, "plain_every": plain_every, "probe_every": probe_every,
                        "min_speedup": min_speedup}
        self.costs: dict[int, AdaptiveK] = {}
        self.proposers: dict[str, AdaptiveK] = {}
        self.thompson, self.prior_weight = thompson, prior_weight
        self.rng = random.Random(seed)
        self._step: dict[str, list[float]] = {}  # this step's [accepted, rejections] per source
        self._draws: dict[str, float] = {}  # this step's acceptance per source
        self.encode_rate: dict[str, float] = {}  # per drafter: seconds per token of a joining row's text

    @staticmethod
    def bucket(batch: int) -> int:
        """Batch sizes share cost estimates by power of two (1, 2, 3-4, 5-8, ...): under live
        traffic the batch size changes at almost every step, and speedups depend on it slowly."""
        return 1 << max(0, batch - 1).bit_length()

    def at(self, batch: int) -> AdaptiveK:
        key = self.bucket(batch)
        if key not in self.costs:
            self.costs[key] = AdaptiveK(k_max=self.k_max, **self.cost_kw)
        return self.costs[key]

    def proposer(self, key: str) -> AdaptiveK:
        if key not in self.proposers:
            self.proposers[key] = AdaptiveK(k_max=self.k_max, **self.kw)
        return self.proposers[key]

    def start_version(self, key: str, acceptance: float | None) -> None:
        """A new version of drafter ``key`` serves from now: its acceptance starts from
        ``acceptance`` (its learners' estimate) at ``prior_weight``; a version published without
        one (registered by hand, distilled elsewhere) starts from the uninformed prior, so it is
        tried rather than judged by the weights it replaced."""
        for p in (self.proposer(key), self.proposer(self.rows_key(key))):
            if acceptance is None:
                p.accepted, p.rejected = 2.0 * p.prior_accept, 2.0 * (1.0 - p.prior_accept)
            else:
                a = min(max(float(acceptance), 0.0), 1.0)
                p.accepted, p.rejected = self.prior_weight * a, self.prior_weight * (1.0 - a)

    def _draw(self, key: str) -> float:
        """This step's acceptance of drafter ``key``'s own drafts: a draw from its posterior
        (``thompson``, one per step), else its mean."""
        p = self.proposer(key)
        if not self.thompson:
            return p.acceptance
        if key not in self._draws:
            self._draws[key] = self.rng.betavariate(1.0 + p.accepted, 1.0 + p.rejected)
        return self._draws[key]

    @staticmethod
    def rows_key(key: str | None) -> str:
        """The acceptance of every draft in the blocks of a drafter's rows (copies and its own),
        which the batch's draft length is chosen on: what a row's block actually yields."""
        return f"rows:{key or ''}"

    def acceptance(self, rows: list[str | None]) -> float:
        """The mean acceptance of the blocks of ``rows`` (each its drafter id, or None without a
        drafter), at the posterior means: the draft length is chosen on them; a draw
        (:meth:`_explore`) only decides whether a step the means would make plain speculates."""
        if not rows:
            return 0.0
        return sum(self.proposer(self.rows_key(key)).acceptance for key in rows) / len(rows)

    def choose(self, rows: list[str | None], batch: int | None = None) -> int:
        """``rows``: the drafter of each row the choice applies to; ``batch``: rows stepped
        (default: as many). Starts a step: acceptance draws are fresh."""
        self._draws.clear()
        if not rows:
            return 0
        return self.at(batch or len(rows)).choose(self.acceptance(rows), self._explore(rows))

    def _explore(self, rows: list[str | None]) -> float | None:
        """The blocks' acceptance with the sources known from fewer than ``prior_weight`` blocks
        drawn from their Beta posteriors (``thompson``), the others at their means: a cold
        start's estimate made of a few unlucky blocks is tried again soon; one that rests on as
        much as a published estimate is trusted (the probes refresh it): exploring a known
        break-even source at 16 rows cost about 1% of throughput."""
        if not self.thompson or not rows:
            return None
        drawn = []
        for key in rows:
            p = self.proposer(self.rows_key(key))
            drawn.append(self._draw(self.rows_key(key)) if p.accepted + p.rejected < self.prior_weight else p.acceptance)
        return sum(drawn) / len(drawn)

    def rechoose(self, rows: list[str | None], batch: int) -> int:
        """The draft length again within a step, for ``rows`` whose blocks changed source (a muted
        drafter's rows take copies only: their blocks are sized as suffix blocks, ``None``)."""
        return self.at(batch).choose(self.acceptance(rows), self._explore(rows)) if rows else 0

    def saving_per_token(self, key: str | None, k: int, batch: int) -> float:
        """Seconds a row of drafter ``key`` saves per token it generates in steps of ``batch`` rows
        drafting ``k`` (negative: speculation costs; inf: costs not measured yet)."""
        costs = self.at(batch)
        if not k or costs.t_plain is None or costs.t_draft is None:
            return float("inf") if k else 0.0
        tokens = expected_tokens(self.proposer(self.rows_key(key)).acceptance, k)
        return (tokens * costs.t_plain - costs.step_seconds(k)) / (batch * tokens)

    def observe_join(self, key: str, seconds: float, tokens: int) -> None:
        """Drafter ``key`` encoded ``tokens`` of a joining row's text in ``seconds``."""
        rate = seconds / max(1, tokens)
        old = self.encode_rate.get(key)
        self.encode_rate[key] = rate if old is None else 0.9 * old + 0.1 * rate

    def join_pays(self, key: str, k: int, batch: int, tokens: int, tokens_left: int) -> bool:
        """Whether a row with ``tokens`` of text that drafter ``key`` has not encoded yet should
        join it now: the encoding is paid once, the saving per token at most ``tokens_left``
        times (a request near its end, or one that joins only because the load dropped for a
        moment, would spend more encoding its text than its drafts bring back)."""
        rate = self.encode_rate.get(key)
        if rate is None:
            return True  # the encoding cost is not measured yet
        return self.saving_per_token(key, k, batch) * tokens_left >= rate * tokens

    def drafts_pay(self, key: str, k: int, batch: int) -> bool:
        """Whether drafter ``key``'s own drafts earn their drafting cost in a step of ``batch``
        rows drafting ``k`` (the verification is the batch's, paid whoever drafts): expected
        accepted drafts x the plain step >= k x the drafting cost per position."""
        costs = self.at(batch)
        if not k or costs.t_plain is None or costs.t_draft is None:
            return True
        if costs.plain_streak >= 4 * costs.probe_every:
            return True  # a long plain streak: every drafter drafts once, so the drafting cost is measured again
        return (expected_tokens(self._draw(key), k) - 1.0) * costs.t_plain >= k * costs.t_draft

    def observe_row(self, key: str | None, copied: list[bool], accepted: int, asked: int | None = None,
                    muted: bool = False) -> None:
        """A row's block: ``copied[i]`` whether draft ``i`` was a copy, ``accepted`` the drafts
        kept, ``asked`` the drafts it was asked for. Each source is credited its accepted drafts
        and charged the rejection if it drafted the rejected position (drafts after it were never
        judged). A block that ended early, all accepted, because nothing matched where only copies
        could draft (no drafter, or ``muted``) ends as a rejection would: suffix speculation is
        charged it, so its acceptance is the chance of an accepted token at a position, which is
        what the expected tokens of a step need."""
        drafted = len(copied)
        unmatched = asked is not None and accepted == drafted < asked and (key is None or muted)
        if not drafted and not unmatched:
            return
        copies_accepted = sum(copied[:accepted])
        rejected = accepted < drafted
        for source, acc, rej in ((SUFFIX, copies_accepted, (rejected and copied[accepted]) or unmatched),
                                 (key, accepted - copies_accepted, rejected and not copied[accepted]),
                                 # the block as a whole: a row that got nothing yields one token for
                                 # its k + 1 verified positions (rows are padded to the longest), a
                                 # block cut short
                                 (self.rows_key(key), accepted, rejected or unmatched)):
            if source is not None and (acc or rej):
                counts = self._step.setdefault(source, [0.0, 0.0])
                counts[0] += acc
                counts[1] += rej

    def probing(self, batch: int) -> bool:
        """Whether this step of ``batch`` rows is a probe (speculation not expected to pay):
        a drafter then drafts only for rows it holds already, since encoding the others would
        make the probe cost several steps."""
        return self.at(batch).probing

    def observe_step(self, batch: int, drafted: int, draft_seconds: float, verify_seconds: float,
                     join_seconds: float = 0.0) -> None:
        """A step of ``batch`` rows whose longest draft was ``drafted`` (0: a plain step); the
        rows it observed update their sources' acceptance together. ``verify_seconds``: the
        target's forward and the accepting and rewinding of every row; ``join_seconds``: drafters
        encoding rows new to them."""
        for key, (accepted, rejections) in self._step.items():
            self.proposer(key).observe_counts(accepted, rejections)
        self._step.clear()
        costs = self.at(batch)
        if drafted:
            costs.observe_costs(drafted, draft_seconds, verify_seconds, join_seconds)
        else:
            costs.observe_plain(verify_seconds)
