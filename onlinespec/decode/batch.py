"""Continuous batching: every active request advances in one target forward per step.

A :class:`Batch` holds the requests being served (each a :class:`~onlinespec.decode.engine.Generation`
with its tokens, stop state, generator, statistics and feedback) and their keys and values in
slot caches (:mod:`onlinespec.decode.slots`): one for the target, one per Hugging Face drafter.
Requests join and leave between steps. Each :meth:`Batch.step`:

1. **prefill**: requests that joined feed their prompts in chunks, at most ``prefill_tokens``
   a step over all of them, in one forward of their own (a long prompt never stalls the others
   for more than one chunk), from where the prefix cache's match ends, if there is one
   (:mod:`onlinespec.decode.prefix`: it keeps prompts once read, and finished requests' text);
   a request whose prompt is in takes a row (its keys and values are copied in); its drafter encodes its text the first time it drafts for it, and only if the
   row has enough tokens left to earn that back (in a probe, only the shortest row, and only
   where the drafter holds none);
2. **propose**: ``k`` from :class:`~onlinespec.decode.adaptive.BatchK` (costs measured at this batch
   size, acceptance per source of drafts; ``k = 0`` where speculation would not pay; a drafter
   whose own drafts would not earn their cost is muted for the step, and every drafter is where
   copies alone would yield more). Per draft position,
   the proposers (:mod:`onlinespec.decode.proposers`) draft in turn for the rows still without a draft
   there: suffix copies where a row's text matches, then each drafter for its rows in one
   forward, then other drafters' blocks;
3. **verify**: one target forward over every row's last settled token and drafts, ragged;
4. **accept**, row by row, as a single request does (:meth:`Generation.settle`): the same
   rejection rule with the request's own generator, the same feedback record;
5. **rewind** every row to what it settled; finished rows leave.

A request keeps the drafter it started with (its keys are that drafter's); a pool switch
applies to requests that start after it, and a hot swap of weights applies at the next step.
Not thread-safe: one engine loop drives it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onlinespec.decode.adaptive import BatchK
from onlinespec.drafters.base import Proposal
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import Generation, SpeculativeEngine, StepOutput
from onlinespec.errors import InvalidRequestError
from onlinespec.decode.features import FeatureLog
from onlinespec.decode.prefix import PrefixCache
from onlinespec.decode.proposers import Blocks, Copies, DraftRows, FeatureRows
from onlinespec.drafters.feature import is_feature
from onlinespec.decode.slots import SlotCache, forward_rows, leave_row

__all__ = ["Batch", "StepTiming", "run_batched", "PREFIX_SCOPES"]

PREFIX_SCOPES = ("shared", "tenant")  # who reads what the prefix cache keeps: everyone, or its tenant

@dataclass(frozen=True)
class StepTiming:
    """What the last step did, for metrics and the benchmark."""

    rows: int = 0
    k: int = 0  # the batch's draft length (rows may draft fewer)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0  # the target forward
    settle_seconds: float = 0.0  # accepting and rewinding every row
    tokens: int = 0  # tokens the rows settled

    PHASES = ("prefill", "draft", "verify", "settle")

    @property
    def phases(self) -> dict[str, float]:
        """Seconds of each phase of the step (:data:`PHASES`)."""
        return {phase: getattr(self, f"{phase}_seconds") for phase in self.PHASES}

    @property
    def decode_seconds(self) -> float:
        """The step without its prefill: drafting, verifying, settling."""
        return self.draft_seconds + self.verify_seconds + self.settle_seconds


class Batch:
    """The requests one engine serves together (at most ``slots``), stepped as one."""

    def __init__(self, engine: SpeculativeEngine, slots: int = 8, prefill_tokens: int = 256,
                 kv_tokens: int | None = None, prefix_tokens: int = 0, prefix_scope: str = "shared"):
        """``kv_tokens``: key/value positions the requests may reserve together (each reserves
        its prompt, ``max_new_tokens`` and one verification block; rows share one layout, so the
        longest reservation counts for every row): a request waits until it fits
        (:meth:`fits`). None: only ``slots`` bounds the batch. ``prefix_tokens``: positions of
        text read before that a :class:`~onlinespec.decode.prefix.PrefixCache` keeps for later
        prompts that begin the same way (0: none); with ``kv_tokens`` they count within it, and
        the requests come first: the cache gives up its least recently used text to whatever
        room they leave (:meth:`_fit_prefix`), as vLLM's cached blocks do. ``prefix_scope``:
        ``shared`` by every request, or ``tenant``: each tenant reads only what its own requests
        left (requests with neither a tenant nor a ``cache_salt`` neither read nor leave
        anything); a request's ``cache_salt`` narrows either to the requests with that salt."""
        assert slots >= 1 and prefill_tokens >= 1
        self.engine = engine
        self.slots = slots
        self.prefill_tokens = prefill_tokens
        self.kv_tokens = kv_tokens
        limit = engine.max_context() or 8192
        self.max_len = limit + engine.config.k_max + 1
        self.cache = SlotCache.for_model(engine.target, slots, self.max_len)
        self.staging = SlotCache.for_model(engine.target, slots, self.max_len)  # prompts being prefilled
        self.rows: list[Generation] = []  # row b of self.cache
        self.staged: list[Generation] = []  # row b of self.staging
        self.copies, self.blocks = Copies(), Blocks()
        self.drafters: dict[int, DraftRows] = {}  # by id() of the drafter object
        self.k: BatchK = engine.k_controller
        assert prefix_scope in PREFIX_SCOPES, f"prefix_scope is one of {PREFIX_SCOPES}"
        self.prefix = PrefixCache(prefix_tokens) if prefix_tokens else None
        self.prefix_scope = prefix_scope
        self.last = StepTiming()

    def __len__(self) -> int:
        return len(self.rows) + len(self.staged)

    @property
    def room(self) -> int:
        return self.slots - len(self)

    @property
    def generations(self) -> list[Generation]:
        return [*self.rows, *self.staged]

    def reservation(self, gen: Generation) -> int:
        """Key/value positions a request may take: its prompt, its tokens, one verified block."""
        return self._reservation(len(gen.prompt), gen.params.max_new_tokens)

    def _reservation(self, prompt_len: int, max_new_tokens: int) -> int:
        return prompt_len + max_new_tokens + self.engine.config.k_max + 1

    @property
    def reserved(self) -> int:
        """Positions the batch's layout reserves now: its rows x the longest reservation."""
        gens = self.generations
        return len(gens) * max(map(self.reservation, gens)) if gens else 0

    def check_admissible(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request whose reservation exceeds ``kv_tokens`` even alone: it would wait forever."""
        need = self._reservation(prompt_len, max_new_tokens)
        if self.kv_tokens is not None and need > self.kv_tokens:
            raise InvalidRequestError(
                f"the prompt ({prompt_len} tokens) and max_tokens ({max_new_tokens}) need "
                f"{need} key/value positions; this server holds {self.kv_tokens} "
                "(serving.kv_cache_tokens): send a shorter prompt or fewer max_tokens")

    def fits(self, gen: Generation) -> bool:
        """Whether ``gen`` may join now (a free slot, and its reservation within ``kv_tokens``)."""
        if self.room <= 0:
            return False
        if self.kv_tokens is None:
            return True
        gens = self.generations
        longest = max([self.reservation(gen), *map(self.reservation, gens)])
        return (len(gens) + 1) * longest <= self.kv_tokens

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes + self.staging.nbytes + sum(d.cache.nbytes for d in self.drafters.values())

    def add(self, gen: Generation) -> None:
        """A started request joins (its prompt is prefilled over the next steps)."""
        assert self.room > 0, f"the batch is full ({self.slots} slots)"
        assert not gen.finished and not gen.generated, "a fresh generation joins"
        if gen.capture or (isinstance(gen.drafter, HFDrafter) and is_feature(gen.drafter.model)):
            gen.features = FeatureLog()  # its drafter reads the target's features, or its learners will
        row = self.staging.join()
        self.staged.append(gen)
        # the prompt's beginning read before (its last token is fed with drafts); not for a request
        # that scores its prompt: what was read before left no logits
        if self._prefixed(gen) and gen.params.prompt_logprobs is None:
            gen.cached_tokens = self.prefix.load(gen.tokens[:-1], self.staging, row, gen.features,
                                                 self._prefix_key(gen))
        self._fit_prefix()

    def _fit_prefix(self) -> None:
        """Keep the prefix cache within the key/value room the batch's reservations leave."""
        if self.prefix is not None and self.kv_tokens is not None:
            self.prefix.shrink(self.kv_tokens - self.reserved)

    def remove(self, gen: Generation) -> None:
        """A request leaves (finished, cancelled or failed); its rows are freed."""
        if gen in self.staged:
            leave_row(self.staging, self.staged, gen)
            return
        leave_row(self.cache, self.rows, gen)
        rows = self._draft_rows(gen)
        if rows is not None:
            rows.leave(gen)
            if not any(g.drafter is rows.drafter for g in self.rows):
                del self.drafters[id(rows.drafter)]

    def _prefixed(self, gen: Generation) -> bool:
        """Whether ``gen`` reads and leaves text in the prefix cache (under ``tenant`` scope, a
        request with neither a tenant nor a salt does not)."""
        return self.prefix is not None and (self.prefix_scope == "shared" or gen.tenant is not None
                                            or gen.cache_salt is not None)

    def _prefix_key(self, gen: Generation):
        """The tree ``gen`` reads and leaves text in: its salt's (vLLM's ``cache_salt``), within its
        tenant's under ``tenant`` scope."""
        return (gen.tenant if self.prefix_scope == "tenant" else None, gen.cache_salt)

    def _draft_rows(self, gen: Generation) -> DraftRows | None:
        return self.drafters.get(id(gen.drafter)) if isinstance(gen.drafter, HFDrafter) else None

    def _join(self, gen: Generation, staged_row: int | None) -> None:
        row = self.cache.join()
        self.rows.append(gen)
        if staged_row is not None:
            self.cache.load(row, self.staging, len(gen.tokens) - 1, source_row=staged_row)
        if isinstance(gen.drafter, HFDrafter) and id(gen.drafter) not in self.drafters:
            # the drafter's rows; each request joins them when first asked to draft
            rows = FeatureRows if is_feature(gen.drafter.model) else DraftRows
            self.drafters[id(gen.drafter)] = rows(gen.drafter, self.slots, self.max_len,
                                                       catch_up=self.engine.config.k_max + 1,
                                                       context=self.engine.config.drafter_context)

    def _prefill(self) -> int:
        """Advance the staged prompts by up to ``prefill_tokens`` in one forward; the prompts that
        are in move to the batch. Returns the tokens fed."""
        done = self.staging.lengths[: len(self.staged)].tolist()
        left = [len(gen.tokens) - 1 - d for gen, d in zip(self.staged, done)]
        # the budget shared evenly by the prompts still being read: rows of one forward are padded
        # to the longest, so one long chunk beside empty rows would waste the whole batch
        share = max(1, self.prefill_tokens // max(1, sum(n > 0 for n in left)))
        feeds = [gen.tokens[d:d + min(n, share)] for gen, d, n in zip(self.staged, done, left)]
        fed = sum(map(len, feeds))
        if fed:
            # a prompt's logits are read only by a request that scores its prompt (its last token
            # is fed with the first drafts)
            scored = any(g.params.prompt_logprobs is not None for g in self.staged)
            hidden = any(g.features is not None for g in self.staged)
            out = forward_rows(self.engine.target, self.staging, feeds, hidden=hidden, logits=scored)
            logits, states = (out if hidden else (out, None)) if scored else (None, out)
            for row, gen in enumerate(self.staged):
                if hidden and gen.features is not None:
                    gen.features.append(states[row])
                if scored:
                    gen.score_prompt(logits[row], done[row])
        ready = [g for row, g in enumerate(self.staged) if int(self.staging.lengths[row]) == len(g.tokens) - 1]
        for gen in ready:
            row = self.staged.index(gen)
            if self._prefixed(gen) and len(gen.tokens) > 1:
                self.prefix.store(gen.tokens, self.staging, row, gen.features, self._prefix_key(gen))
                self._fit_prefix()
            self._join(gen, row if len(gen.tokens) > 1 else None)
            leave_row(self.staging, self.staged, gen)
        return fed

    def _propose(self, k_rows: list[int], muted: set[int] = frozenset()
                 ) -> tuple[list[list[int]], list[list[torch.Tensor | None]], list[list[bool]]]:
        """Up to ``k_rows[b]`` drafts for each row, position by position: each proposer in turn
        (copies, each drafter's rows, other drafters) drafts for the rows still without a draft
        there; a row no proposer drafts for ends its block. Rows in ``muted`` take copies only
        (their drafter's drafts would not pay)."""
        rows = self.rows
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor | None]] = [[] for _ in rows]
        copied: list[list[bool]] = [[] for _ in rows]
        proposers = [self.copies, *self.drafters.values(), self.blocks]
        for i in range(max(k_rows, default=0)):
            need = [b for b, k in enumerate(k_rows) if i < k and len(drafts[b]) == i]
            for proposer in proposers:
                ask = need if proposer is self.copies else [b for b in need if b not in muted]
                if not ask:
                    continue
                room = [k - len(d) for k, d in zip(k_rows, drafts)]
                for b, block in proposer.propose(rows, ask, drafts, i, room).items():
                    for draft in block[: room[b]]:
                        drafts[b].append(draft.token)
                        qs[b].append(draft.q)
                        copied[b].append(draft.copied)
                need = [b for b in need if len(drafts[b]) == i]
        return drafts, qs, copied

    def _proposal(self, drafts: list[int], qs: list[torch.Tensor | None]) -> Proposal:
        tokens = torch.tensor(drafts, dtype=torch.long)
        sampled = [q for q in qs if q is not None]
        if not sampled:
            return Proposal(tokens, None)
        # the drafter's rows are distributions; copied ones are one-hot, on the same device
        one_hot = torch.nn.functional.one_hot(tokens, self.engine.vocab_size).to(sampled[0])
        return Proposal(tokens, torch.stack([q if q is not None else one_hot[i] for i, q in enumerate(qs)]))

    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, StepOutput | Exception]]:
        """One step of every row. Returns each stepped request's output, or the exception that
        failed it (that request alone: it has left the batch; the others went on)."""
        t0 = time.perf_counter()
        fed = self._prefill() if self.staged else 0
        t1 = time.perf_counter()
        rows = list(self.rows)
        if not rows:
            self.last = StepTiming(prefill_tokens=fed, prefill_seconds=t1 - t0)
            return []
        adaptive = [g for g in rows if g.adaptive]
        # rows that drafted long enough to tell are judged on their own acceptance
        own = {g: (g.stats.accepted, g.stats.rejections) for g in adaptive
               if self.k.per_row and g.stats.spec_steps >= self.k.ROW_MIN_STEPS}
        k = (self.k.choose([_drafter_key(g) for g in adaptive], batch=len(rows), own=[own.get(g) for g in adaptive])
             if adaptive else None)
        # a drafter whose own drafts would not earn their cost drafts for nobody this step (its
        # rows still take copies); requests with a fixed k keep theirs
        pays = {key: self.k.drafts_pay(key, k, len(rows))
                for key in {g.drafter.drafter_id for g in adaptive if g.drafter is not None}}
        muted = {b for b, g in enumerate(rows) if g.adaptive and g.drafter is not None
                 and not pays[g.drafter.drafter_id]}
        # and every drafter is, for the rows suffix speculation drafts for, where copies alone
        # would yield more
        copying = [b for b, g in enumerate(rows) if g.adaptive and g.index is not None]
        if copying and self.k.copies_pay_more([_drafter_key(rows[b]) for b in copying], len(rows)):
            muted.update(b for b in copying if rows[b].drafter is not None)
        if k:
            # rows a drafter does not hold yet join it only where that pays: in a probe only the
            # shortest, and only where it holds none of the batch's rows (a probe must draft to
            # measure anything, but encoding every row would make it cost several steps; at one
            # row every request is new to it, and a probe that joined nobody never drafted again),
            # otherwise only if the row has enough tokens left to earn back the encoding of its
            # text; the others take copies
            probing = self.k.probing(len(rows))
            waiting: dict[DraftRows, list[int]] = {}  # per drafter: its rows left out this step
            for b, g in enumerate(rows):
                group = self._draft_rows(g)
                if b in muted or not g.adaptive or group is None or group.joined(g):
                    continue
                left = g.params.max_new_tokens - len(g.generated)
                if probing or not self.k.join_pays(g.drafter.drafter_id, k, len(rows), len(g.tokens) - 1, left):
                    muted.add(b)
                    waiting.setdefault(group, []).append(b)
            if probing:
                for group, group_rows in waiting.items():
                    if not any(group.joined(g) for b, g in enumerate(rows) if b not in muted):
                        muted.discard(min(group_rows, key=lambda b: len(rows[b].tokens)))
        # a muted drafter's rows make copy-only blocks: the draft length follows what those yield
        # (a weak drafter must not shorten the copies of the rows it does not draft for)
        row_keys = [None if (g.drafter is None or b in muted) else g.drafter.drafter_id for b, g in enumerate(rows)]
        if muted:
            k = self.k.rechoose([key for key, g in zip(row_keys, rows) if g.adaptive], batch=len(rows),
                                own=[own.get(g) for g in adaptive])
        k_rows = [g.draft_length(k) for g in rows]
        if k and self.k.per_row:
            # a row whose own drafts fared worse than its source's drafts fewer (rows are packed:
            # its positions not drafted cost nothing); the last rows of a closed loop are the
            # ones with the lowest acceptance, verified at the batch's k at 2 tokens a step
            for b, g in enumerate(rows):
                if g.adaptive and k_rows[b] and g.stats.spec_steps >= self.k.ROW_MIN_STEPS:
                    k_rows[b] = min(k_rows[b], self.k.row_length(row_keys[b], k, len(rows), g.stats.accepted,
                                                                 g.stats.rejections))
        drafts, qs, copied = self._propose(k_rows, muted)
        t2 = time.perf_counter()
        # rows joining a drafter encode their text: reported as prefill, costed apart from drafting
        joined = 0.0
        for group in self.drafters.values():
            for seconds, tokens in group.joins:
                self.k.observe_join(group.drafter.drafter_id, seconds, tokens)
                joined += seconds
            group.joins.clear()
        feeds = [[g.tokens[-1], *d] for g, d in zip(rows, drafts)]
        states = None
        if any(g.features is not None for g in rows):  # feature drafters read the target's features
            logits, states = forward_rows(self.engine.target, self.cache, feeds, hidden=True)
        else:
            logits = forward_rows(self.engine.target, self.cache, feeds)
        t3 = time.perf_counter()
        results: list[tuple[Generation, StepOutput | Exception]] = []
        leaving = []
        for b, gen in enumerate(rows):
            try:
                out = gen.settle(self._proposal(drafts[b], qs[b]), copied[b], logits[b], t2 - t1 - joined, t3 - t2)
            except Exception as exc:  # noqa: BLE001 - one request's failure leaves the others going
                results.append((gen, exc))
                leaving.append(gen)
                continue
            results.append((gen, out))
            if gen.features is not None and (gen.capture or not gen.finished):  # the features of what settled
                gen.features.append(states[b][: len(gen.tokens) - 1 - len(gen.features)])
            if gen.adaptive:  # a muted row's block was a suffix block: credited as one, as without a drafter
                self.k.observe_row(row_keys[b], copied[b], out.accepted, asked=k_rows[b])
            if gen.finished:
                if self._prefixed(gen) and not gen.isolated:  # a conversation's next turn begins with it
                    self.cache.rewind(b, min(len(gen.tokens) - 1, int(self.cache.lengths[b])))
                    self.prefix.store(gen.tokens, self.cache, b, gen.features, self._prefix_key(gen))
                    self._fit_prefix()
                leaving.append(gen)
            else:  # keep every settled token but the newest (it is fed with the next drafts)
                keep = len(gen.tokens) - 1
                self.cache.rewind(b, keep)
                group = self._draft_rows(gen)
                if group is not None:
                    group.rewind(gen, keep)
        drafted = max(map(len, drafts))
        t4 = time.perf_counter()
        if adaptive:
            # what speculation costs the batch, as measured: drafting, the drafters' encoding of
            # rows new to them (under load requests come and go, each encoded once), and
            # verification with accepting and rewinding every row (k + 1 logits a row)
            self.k.observe_step(len(rows), drafted, t2 - t1 - joined, t4 - t2, joined)
        for gen in leaving:
            self.remove(gen)
        settled = sum(len(out.tokens) for _, out in results if isinstance(out, StepOutput))
        self.last = StepTiming(len(rows), drafted, fed, t1 - t0 + joined, t2 - t1 - joined, t3 - t2, t4 - t3, settled)
        return results


def _drafter_key(gen: Generation) -> str | None:
    """The id of the drafter a request drafts with (None: copies only)."""
    return gen.drafter.drafter_id if gen.drafter is not None else None


def run_batched(engine: SpeculativeEngine, gens: list[Generation], slots: int = 8,
                prefill_tokens: int = 256) -> list[Generation]:
    """Serve started generations to the end in one continuous batch (at most ``slots`` at a
    time, each joining as another leaves); returns them, finished, in the order given.
    Raises the first request failure."""
    batch = Batch(engine, slots=slots, prefill_tokens=prefill_tokens)
    waiting = list(gens)
    while waiting or len(batch):
        while waiting and batch.room:
            batch.add(waiting.pop(0))
        for _, out in batch.step():
            if isinstance(out, Exception):
                raise out
    return gens
