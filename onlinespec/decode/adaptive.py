"""Choosing the draft length ``k`` from measured acceptance and cost.

With a per-token acceptance rate ``a`` (drafts accepted independently, the usual model), a
block of ``k`` drafts yields ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation. A step costs
``k * t_draft + t_verify(k)``, while plain target decoding costs ``t_plain`` a token, so

    speedup(k) = tokens(k) * t_plain / (k * t_draft + t_verify(k)),   t_verify(k) = t_plain + extra(k)  (k >= 1)

(``extra(k)``: what verifying ``k`` drafts costs beyond a plain step, as measured at each draft
length the controller has drafted, :meth:`AdaptiveK.verify_extra`). On a CPU that cost is
neither proportional to ``k`` nor linear in it: at 8 rows of SmolLM2-135M a verify forward took
87 / 140 / 155 / 184 ms for k = 0 / 1 / 2 / 4 (the first position dearest: memory-bound), at 16
rows 120 / 200 / 220 / 400 ms for k = 0 / 3 / 4 / 8 (dearer per position past 80 positions:
compute-bound). A cost per position fitted on short blocks priced k = 4 at 290 ms and locked the
batch into plain decoding; a straight line ``v0 + v k`` fitted on k = 8 steps and one slow
first k = 1 step (a cache growing) priced k = 4 at 338 ms against 220 and kept a 16-row batch at
k = 8 (156 tokens/s where k = 4 gave 187). Lengths not measured are priced on the optimistic
side of the measured ones, and the lengths next to the best one are each tried once (climbing
to the best length a step at a time, as a cost curve that bends can only be read by drafting).
Under batching the tokens a block yields are measured position by position
(:class:`BlockLengths`), not assumed alike at every position. The controller picks the ``k`` in
``[k_min, k_max]`` that maximizes it; when no ``k`` beats plain decoding it decodes plainly and
probes again every ``probe_every`` steps so it notices when the drafter has improved.
All estimates are exponentially weighted, so they follow a drifting drafter.

Under batching (:class:`BatchK`) the same rule runs per batch size: a step of ``B`` rows costs
``t_plain(B)`` plain and ``k * t_draft(B) + t_plain(B) + extra(B, k) + t_join(B)`` with drafts, every
row expecting the ``tokens(k)`` its source's blocks yield, so ``k = 0`` (plain batched decoding)
wins wherever verifying ``B x (k+1)`` positions costs more than the drafts bring. The costs are
what the batch measures, not what the forwards alone take: verification includes accepting and
rewinding every row, and ``t_join`` is the drafters' encoding of rows new to them (under load
requests come and go, and each is encoded once). A probe that keeps saying "plain" doubles the
wait before the next one (``max_backoff``), since under load a probe costs a slow step.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveK", "BatchK", "BlockLengths", "SUFFIX", "block_tokens", "expected_tokens", "theoretical_speedup"]

SUFFIX = "__suffix__"  # the acceptance of suffix copies, whichever row they drafted for


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens per step (accepted drafts + the target's token) at acceptance rate a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


# what a block yields: an acceptance per position (alike and apart), or the tokens of a block of k
Yield = float | Callable[[int], float]


def block_tokens(blocks: Yield, k: int) -> float:
    """Mean tokens of a step drafting ``k`` (accepted drafts + the target's token)."""
    return blocks(k) if callable(blocks) else expected_tokens(blocks, k)


class BlockLengths:
    """How far a source's blocks get, position by position: decayed counts of blocks that passed
    and that stopped at each draft position (Kaplan-Meier: a block cut short by its length tells
    nothing of the positions after it). One acceptance for every position over-promises where
    blocks are all or nothing: suffix copies are accepted whole where the text repeats and give
    one token where it does not (half of each at k = 4: 3.0 tokens a step, while 0.8 accepted
    per position promises 3.36). Measured at 8 rows of SmolLM2 edit traffic, the blocks yielded
    13% fewer tokens than the per-position acceptance promised, and the batch speculated where
    it did not pay."""

    def __init__(self, k_max: int, decay: float):
        self.decay = decay
        self.passed = [0.0] * k_max
        self.stopped = [0.0] * k_max

    def observe(self, blocks: list[tuple[int, bool]]) -> None:
        """One step's blocks, each (drafts accepted, whether it stopped there: a rejection)."""
        d = self.decay
        self.passed = [d * x for x in self.passed]
        self.stopped = [d * x for x in self.stopped]
        for accepted, stopped in blocks:
            for i in range(min(accepted, len(self.passed))):
                self.passed[i] += 1.0
            if stopped and accepted < len(self.stopped):
                self.stopped[accepted] += 1.0

    def tokens(self, k: int, acceptance: float, weight: float = 2.0) -> float:
        """Mean tokens of a block of ``k``: each position's chance to stop is its counts' with
        ``weight`` blocks of ``1 - acceptance`` added (a position seldom reached is priced as
        the source's acceptance says)."""
        return self.table(k, acceptance, weight)[k]

    def table(self, k_max: int, acceptance: float, weight: float = 2.0) -> list[float]:
        """:meth:`tokens` of every block length ``0 .. k_max``, in one pass."""
        out = [1.0]
        total = alive = 1.0
        for i in range(k_max):
            seen = self.passed[i] + self.stopped[i] if i < len(self.passed) else 0.0
            stop = ((self.stopped[i] if i < len(self.stopped) else 0.0) + weight * (1.0 - acceptance)) / (seen + weight)
            alive *= 1.0 - stop
            total += alive
            out.append(total)
        return out


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

    FIRST = 3  # the first timings of a cost, whose median it starts from (see _cost)
    RECENT = 5  # the timings of a cost an outlier is judged against

    def __post_init__(self):
        assert 1 <= self.k_min <= self.k_max, f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}"
        # Acceptance as decayed counts of accepted drafts and of rejections (a truncated geometric).
        self.accepted = 2.0 * self.prior_accept
        self.rejected = 2.0 * (1.0 - self.prior_accept)
        self.t_plain: float | None = None  # seconds per plain target step
        self.t_draft: float | None = None  # seconds per drafted token
        self._recent: dict[str, deque[float]] = {}  # the last timings of each cost
        # extra verify seconds beyond a plain step, per draft length measured (see verify_extra)
        self.extra: dict[int, float] = {}
        self.v: float = 0.0  # extra verify seconds per drafted position while no length is measured
        self._explored: set[int] = set()  # lengths tried once because their cost was not measured
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
        return k * self.t_draft + self.t_plain + self.verify_extra(k) + self.t_join

    def verify_extra(self, k: int) -> float:
        """What verifying ``k`` drafts costs beyond a plain step: as measured at ``k``; for a length
        not measured, the optimistic side of the measured ones: the lower of the line between
        the nearest measured lengths around it and the next longer one's cost in proportion
        (``k / k_hi`` of it); beyond the longest measured, that one's cost. A length priced too
        low gets tried and measured; one priced too high would never be (the fitted line of
        earlier versions priced k = 4 from k = 8 steps and one slow k = 1 step at 1.5x what it
        took). Nothing measured yet: ``v`` per position."""
        if not k:
            return 0.0
        if k in self.extra:
            return self.extra[k]
        if not self.extra:
            return self.v * k
        longer = [j for j in self.extra if j > k]
        shorter = [j for j in self.extra if j < k]
        if not longer:
            return self.extra[max(shorter)]
        hi = min(longer)
        guess = self.extra[hi] * k / hi
        if shorter:
            lo = max(shorter)
            guess = min(guess, self.extra[lo] + (self.extra[hi] - self.extra[lo]) * (k - lo) / (hi - lo))
        return guess

    def speedup(self, k: int, acceptance: Yield | None = None) -> float:
        if self.t_plain is None or self.t_draft is None:
            return float("inf")  # unmeasured: speculate to learn the costs
        a = self.acceptance if acceptance is None else acceptance
        return block_tokens(a, k) * self.t_plain / self.step_seconds(k)

    def best_k(self, acceptance: Yield | None = None) -> int:
        return max(range(self.k_min, self.k_max + 1), key=lambda k: self.speedup(k, acceptance))

    def choose(self, acceptance: Yield | None = None, explore: Yield | None = None) -> int:
        """Draft length for the next step; 0 means one plain target step. ``acceptance``: the
        one to assume (default: this controller's own estimate), or what a block of each length
        yields; ``explore``: the same drawn from its posterior. Where the estimate says plain
        but the draw says speculation would pay, the step speculates at the draw's best ``k``:
        an estimate made of a few unlucky blocks (a cold start) is tried again soon, a
        confident one rarely."""
        if self.t_plain is None:
            return 0  # measure plain decoding once first
        self.probing = False
        k = self.best_k(acceptance)
        if self.speedup(k, acceptance) >= self.min_speedup:
            if self.plain_every and self.spec_streak >= self._plain_due():
                return 0
            return self._neighbour(k)
        if explore is not None:
            drawn = self.best_k(explore)
            if self.speedup(drawn, explore) >= self.min_speedup:
                return drawn
        if self.plain_streak >= self.probe_every * self.backoff:
            self.probing = True  # one speculative step refreshes the estimates
            return k
        return 0

    def _neighbour(self, k: int) -> int:
        """``k``, or once each, a length next to it whose cost is not measured (``k + 1`` first):
        what a length costs is known only once it is drafted, so the best length is found by
        climbing from the one measured best (guesses between measured lengths are off where the
        cost bends: at 16 rows of SmolLM2, 0.06 s at k = 2 and 0.28 at k = 8 priced k = 3 above
        what it took, and the batch stayed at k = 2)."""
        if self.t_draft is None or not self.extra:
            return k
        for n in (k + 1, k - 1):
            if self.k_min <= n <= self.k_max and n not in self.extra and n not in self._explored:
                self._explored.add(n)
                return n
        return k

    def _plain_due(self) -> int:
        """Speculative steps after which a plain one refreshes ``t_plain``: ``plain_every``, but an
        eighth of it while fewer than ``FIRST`` plain steps were measured (at 16 users of
        SmolLM2 a batch size's plain cost came from one step of the ramp-up, 15% above what
        plain steps took, and stayed so for the whole run: 28 steps at that size, under
        ``plain_every``)."""
        if len(self._recent.get("plain", ())) >= self.FIRST:
            return self.plain_every
        return max(1, self.plain_every // 8)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def _cost(self, name: str, old: float | None, new: float) -> float:
        """A timing's moving average that a slow step (a cache growing, a collection, another
        process) moves by at most as much as a step twice the median of the last ``RECENT``
        timings of that cost: plain steps are rare while speculating, and one outlier among
        them used to double the plain cost for tens of steps, making every verification look
        free. The first ``FIRST`` timings give their median: a batch size's first speculative
        step pays once for what later steps reuse (at 8 rows of SmolLM2 the feature drafter's
        first step took 229 ms, the next ones under 30 ms), and a drafting cost taken from it
        muted speculation at that batch size for hundreds of steps (only the speculative steps
        it forbade could have lowered it)."""
        recent = self._recent.setdefault(name, deque(maxlen=self.RECENT))
        recent.append(new)
        typical = sorted(recent)[(len(recent) - 1) // 2]  # one timing: itself; two: the faster
        if old is None or len(recent) <= self.FIRST:
            return typical
        return self._ema(old, min(new, 2.0 * typical))

    def observe_plain(self, seconds: float) -> None:
        self.t_plain = self._cost("plain", self.t_plain, seconds)
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
        self.t_draft = self._cost("draft", self.t_draft, draft_seconds / drafted)
        if self.t_plain is not None:  # the first timings give their median, an outlier moves it by a bounded step
            extra = max(0.0, verify_seconds - self.t_plain)
            self.extra[drafted] = self._cost(f"extra:{drafted}", self.extra.get(drafted), extra)


class BatchK:
    """The draft length of a batch step: costs measured per batch size (one :class:`AdaptiveK`
    each, probing included), acceptance per source of drafts: each drafter's own drafts (by
    drafter id) and suffix copies (:data:`SUFFIX`), each counted only on the positions it drafted.

    The batch's draft length is chosen on what each row's blocks yield (copies and drafts
    together, per drafter: :meth:`rows_key`; measured position by position, :class:`BlockLengths`;
    a row that drafted long enough, on its own acceptance: :meth:`blocks`);
    each drafter's own acceptance decides whether it drafts at all in a step (:meth:`drafts_pay`),
    and every drafter is muted where copies alone would yield more (:meth:`copies_pay_more`).

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

    ROW_PRIOR = 4.0  # blocks of its source's acceptance a row's own is shrunk toward
    ROW_MIN_STEPS = 3  # speculative steps of a row before its own acceptance shortens its drafts

    def __init__(self, k_max: int = 8, cost_decay: float = 0.95, plain_every: int = 32, probe_every: int = 8,
                 thompson: bool = True, prior_weight: float = 20.0, seed: int = 0, min_speedup: float = 1.0,
                 per_row: bool = True, **kw):
        """Costs follow the last ~20 steps at each batch size (``cost_decay``; a shared machine's
        timings drift); a plain step every ``plain_every`` speculative ones keeps the plain
        cost, which every other cost is measured against, fresh. ``prior_weight``: the drafts a
        version's published estimate counts as (a few steps of a batch). ``min_speedup``: the
        predicted gain a speculative step must show (the model of a step is approximate: at
        break-even, plain decoding is the safe side)."""
        self.k_max, self.kw = k_max, kw
        self.per_row = per_row  # rows draft fewer where their own acceptance says so (row_length)
        self.cost_kw = {**kw, "decay": cost_decay, "plain_every": plain_every, "probe_every": probe_every,
                        "min_speedup": min_speedup}
        self.costs: dict[int, AdaptiveK] = {}
        self.proposers: dict[str, AdaptiveK] = {}
        self.thompson, self.prior_weight = thompson, prior_weight
        self.rng = random.Random(seed)
        self._step: dict[str, list[float]] = {}  # this step's [accepted, rejections] per source
        self._draws: dict[str, float] = {}  # this step's acceptance per source
        self.lengths: dict[str, BlockLengths] = {}  # per rows key: how far its blocks get
        self._blocks: dict[str, list[tuple[int, bool]]] = {}  # this step's blocks per rows key
        self.encode_rate: dict[str, float] = {}  # per drafter: seconds per token of a joining row's text
        self._served: set[str] = set()  # sources whose acceptance rests on served drafts (start_version)

    @staticmethod
    def bucket(batch: int) -> int:
        """Batch sizes share cost estimates by half octaves (1, 2, 3, 4, 5-6, 7-8, 9-12, 13-16,
        17-24, ...): under live traffic the batch size changes at almost every step, and
        speedups depend on it slowly. Octaves were too coarse: at 16 rows of the bundled pair
        the estimates of a 9-16 bucket, half of them from the ramp-up and the drain, priced a
        full batch's speculative step 8-9% below what it took (1-8 rows: within 4%)."""
        top = 1 << max(0, batch - 1).bit_length()
        return 3 * top // 4 if top >= 4 and batch <= 3 * top // 4 else top

    def at(self, batch: int) -> AdaptiveK:
        key = self.bucket(batch)
        if key not in self.costs:
            self.costs[key] = AdaptiveK(k_max=self.k_max, **self.cost_kw)
        return self.costs[key]

    def proposer(self, key: str) -> AdaptiveK:
        if key not in self.proposers:
            self.proposers[key] = AdaptiveK(k_max=self.k_max, **self.kw)
        return self.proposers[key]

    def start_version(self, key: str, acceptance: float | None, previous: float | None = None) -> None:
        """A new version of drafter ``key`` serves from now: its acceptance starts from
        ``acceptance`` (its learners' estimate) at ``prior_weight``; a version published without
        one (registered by hand, distilled elsewhere) starts from the uninformed prior, so it is
        tried rather than judged by the weights it replaced (its blocks' lengths too).

        ``previous``: the estimate the version it replaces was published with, given where the
        new one follows it (a later version of the same learner, not a rollback). Where this
        controller has served drafts of the version it replaces, it keeps what they showed,
        moved by the change the learners measured (``acceptance - previous``; its rows' blocks,
        copies included, by the share of their positions it drafted), at a weight of at most
        ``prior_weight``, and keeps the blocks' lengths. The learners score a drafter
        on the first drafted position of the true text, so their level is not what a served
        block meets (a feature drafter drafts its later positions on its own features: in
        stop 38's last quarter it was estimated at 0.63 and its served drafts were accepted at
        0.31 a drafted token); their change between versions is taken to carry over. Restarting
        every version from the estimate (a swap every 6 s, about 11 blocks drafted between
        swaps) left the controller judging the drafter by the learners' level, not by its
        drafts. A drafter muted for a while follows its learners' gains meanwhile, which its
        served drafts cannot show."""
        carry = acceptance is not None and previous is not None
        if carry:
            # the rows' blocks hold copies too: they move by the share of their judged positions
            # that were the drafter's own
            own, rows = (self.proposer(k).accepted + self.proposer(k).rejected for k in (key, self.rows_key(key)))
            change = {key: float(acceptance) - float(previous)}
            change[self.rows_key(key)] = change[key] * min(1.0, own / rows) if rows > 0 else 0.0
        for k in (key, self.rows_key(key)):
            p = self.proposer(k)
            if carry and k in self._served:
                weight = min(p.accepted + p.rejected, self.prior_weight)
                a = min(max(p.acceptance + change[k], 0.01), 0.99)
                p.accepted, p.rejected = weight * a, weight * (1.0 - a)
                continue
            self._served.discard(k)
            self.lengths.pop(k, None)
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

    def blocks(self, rows: list[str | None], drawn: Callable[[str], bool] = lambda key: False,
               own: list[tuple[int, int] | None] | None = None, batch: int | None = None) -> Yield:
        """What the blocks of ``rows`` yield, as a function of ``k``: the mean over rows of their
        source's tokens per block (:class:`BlockLengths`), shrunk where little is known toward
        its acceptance: the posterior mean, or for the keys ``drawn`` says, a draw (exploration).
        A source known from fewer than ``prior_weight`` blocks yields as its acceptance says,
        alike at every position: its few blocks' lengths would overrule the draw, and a cold
        start whose first blocks were unlucky would never be tried again.

        ``own``: per row, its request's own (accepted drafts, rejections) where it has drafted
        long enough to tell (else None): such a row yields as its own acceptance says
        (:meth:`row_acceptance`), drafting the positions :meth:`row_length` would leave it in
        steps of ``batch`` rows. Rows of one source differ: under load the rows left are the
        ones whose text the drafts miss (at 16 users of SmolLM2, 2-row speculative steps of the
        drain yielded 1.4 tokens a row and cost 28 ms a token against 21 for plain ones)."""
        if not rows:
            return 0.0
        # tabulated at every length once: a choice reads each length several times a step, and
        # at a few rows of a small model the controller's Python weighs as much as a forward
        lengths = range(self.k_max + 1)
        table = [0.0] * (self.k_max + 1)
        own = own or [None] * len(rows)
        for key, n in Counter(self.rows_key(key) for key, mine in zip(rows, own) if mine is None).items():
            p = self.proposer(key)
            a = self._draw(key) if drawn(key) else p.acceptance
            if p.accepted + p.rejected < self.prior_weight:
                tokens = [expected_tokens(a, k) for k in lengths]
            else:
                tokens = self._lengths(key).table(self.k_max, a)
            table = [t + n * x for t, x in zip(table, tokens)]
        mine = [self.row_acceptance(key, *counts) for key, counts in zip(rows, own) if counts is not None]
        if mine:
            per_position = self._per_position(batch)
            for k in lengths:
                cost = per_position(k) if per_position and k else None
                table[k] += sum(expected_tokens(a, self._row_cut(a, k, cost)) for a in mine)
        table = [t / len(rows) for t in table]
        return lambda k: table[min(k, self.k_max)]

    def _lengths(self, key: str) -> BlockLengths:
        if key not in self.lengths:
            self.lengths[key] = BlockLengths(self.k_max, self.proposer(key).decay)
        return self.lengths[key]

    def choose(self, rows: list[str | None], batch: int | None = None,
               own: list[tuple[int, int] | None] | None = None) -> int:
        """``rows``: the drafter of each row the choice applies to; ``batch``: rows stepped
        (default: as many); ``own``: each row's own acceptance counts, where known
        (:meth:`blocks`). Starts a step: acceptance draws are fresh."""
        self._draws.clear()
        if not rows:
            return 0
        return self._choose(rows, batch or len(rows), own)

    def _choose(self, rows: list[str | None], batch: int, own: list | None = None) -> int:
        return self.at(batch).choose(self.blocks(rows, own=own, batch=batch), self._explore(rows, own, batch))

    def _explore(self, rows: list[str | None], own: list | None = None, batch: int | None = None) -> Yield | None:
        """The blocks' yield with the sources known from fewer than ``prior_weight`` blocks
        drawn from their Beta posteriors (``thompson``), the others at their means: a cold
        start's estimate made of a few unlucky blocks is tried again soon; one that rests on as
        much as a published estimate is trusted (the probes refresh it): exploring a known
        break-even source at 16 rows cost about 1% of throughput."""
        if not self.thompson or not rows:
            return None

        def doubtful(key: str) -> bool:
            p = self.proposer(key)
            return p.accepted + p.rejected < self.prior_weight
        drawn = own or [None] * len(rows)  # rows judged on their own counts draw nothing
        if not any(doubtful(self.rows_key(key)) for key, counts in zip(rows, drawn) if counts is None):
            return None  # nothing to draw: the same yield as the means, which said plain already
        return self.blocks(rows, doubtful, own, batch)

    def rechoose(self, rows: list[str | None], batch: int, own: list[tuple[int, int] | None] | None = None) -> int:
        """The draft length again within a step, for ``rows`` whose blocks changed source (a muted
        drafter's rows take copies only: their blocks are sized as suffix blocks, ``None``)."""
        return self._choose(rows, batch, own) if rows else 0

    def copies_pay_more(self, rows: list[str | None], batch: int) -> bool:
        """Whether the blocks of ``rows`` would yield more per second with every drafter muted
        (copies only: their blocks as suffix blocks, :meth:`rows_key` of None) than as they are,
        at each side's best draft length. A weak drafter lowers its rows' blocks wherever the
        copies would have gone on: at 8 rows of edit traffic its blocks were accepted at 0.74
        and copy-only blocks at 0.83, the batch was priced plain on the first, and the copies
        went unused in 93% of steps. The drafters' side is a draw from its posterior
        (``thompson``): a muted drafter's blocks are not observed, so a drafter judged on a few
        unlucky blocks is tried again now and then, and a well-known one rarely."""
        if all(key is None for key in rows):
            return False
        costs = self.at(batch)
        if costs.t_plain is None or costs.t_draft is None:
            return False
        ks = range(1, self.k_max + 1)
        copies = self.blocks([None] * len(rows))
        alone = max(costs.speedup(k, copies) for k in ks)
        if alone < costs.min_speedup:
            return False
        mine = self.blocks(rows, lambda key: key != self.rows_key(None))
        return alone > max(costs.speedup(k, mine) for k in ks)

    def saving_per_token(self, key: str | None, k: int, batch: int) -> float:
        """Seconds a row of drafter ``key`` saves per token it generates in steps of ``batch`` rows
        drafting ``k`` (negative: speculation costs; inf: costs not measured yet)."""
        costs = self.at(batch)
        if not k or costs.t_plain is None or costs.t_draft is None:
            return float("inf") if k else 0.0
        tokens = block_tokens(self.blocks([key]), k)
        return (tokens * costs.t_plain - costs.step_seconds(k)) / (batch * tokens)

    def row_length(self, key: str | None, k: int, batch: int, accepted: int, rejections: int) -> int:
        """Drafts worth asking of one row of drafter ``key`` (None: copies) in a step of ``batch``
        rows drafting ``k``: position ``i`` while the chance that it is reached and accepted,
        ``a^i``, pays for the verification it adds (``extra(k) / k`` a position, against
        ``t_plain`` a token: a step's token is worth ``t_plain / B`` and a position costs
        ``extra / (k B)``, so the batch size cancels). ``a``: the row's own acceptance in its
        request (``accepted`` drafts, ``rejections`` blocks cut short: a truncated geometric),
        shrunk toward its source's blocks with ``ROW_PRIOR`` blocks' weight. Never more than ``k``."""
        per_position = self._per_position(batch)
        return self._row_cut(self.row_acceptance(key, accepted, rejections), k,
                             per_position(k) if per_position and k else None)

    def row_acceptance(self, key: str | None, accepted: int, rejections: int) -> float:
        """A row's own acceptance (``accepted`` drafts, ``rejections`` blocks cut short: a
        truncated geometric), shrunk toward its source's blocks with ``ROW_PRIOR`` blocks' weight."""
        a_src = self.proposer(self.rows_key(key)).acceptance
        return (accepted + self.ROW_PRIOR * a_src) / (accepted + rejections + self.ROW_PRIOR)

    def _per_position(self, batch: int | None) -> Callable[[int], float] | None:
        """What one drafted position of a step drafting ``k`` costs in steps of ``batch`` rows, in
        plain steps (``extra(k) / k / t_plain``); None while the costs are not measured."""
        costs = self.costs.get(self.bucket(batch)) if batch else None
        if costs is None or costs.t_plain is None or costs.t_draft is None or not costs.t_plain:
            return None
        return lambda k: costs.verify_extra(k) / k / costs.t_plain

    @staticmethod
    def _row_cut(a: float, k: int, cost: float | None) -> int:
        """Positions (at most ``k``) a row of acceptance ``a`` drafts in a step drafting ``k``
        whose positions cost ``cost`` plain steps each: position ``i`` while ``a^i`` pays for it
        (all ``k`` while the costs are not measured: ``cost`` None)."""
        if not k or cost is None:
            return k
        n = 0
        while n < k and a ** (n + 1) >= cost:
            n += 1
        return n

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
        self._blocks.setdefault(self.rows_key(key), []).append((accepted, rejected or unmatched))
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
            self._served.add(key)
        self._step.clear()
        for key, blocks in self._blocks.items():
            self._lengths(key).observe(blocks)
        self._blocks.clear()
        costs = self.at(batch)
        if drafted:
            costs.observe_costs(drafted, draft_seconds, verify_seconds, join_seconds)
        else:
            costs.observe_plain(verify_seconds)
