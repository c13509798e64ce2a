"""Proposers: what drafts a batch's rows, one draft position at a time, behind one seam.

At each draft position :class:`~onlinespec.decode.batch.Batch` asks its proposers in turn, each for the
rows still without a draft there: suffix speculation first (:class:`Copies`: free to consult,
and right where the text repeats), then each Hugging Face drafter for its own rows in one
forward (:class:`DraftRows`), then any other drafter, which proposes its whole block at the
first position (:class:`Blocks`: the n-gram drafter, a user's own). A row that no proposer
drafts for stops its block there.

Every proposer returns, per row it drafted for, a list of :class:`Draft` (one, or a block).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.sampling import draw
from onlinespec.decode.slots import SlotCache, forward_rows, leave_row
from onlinespec.decode.suffix import best_match

if TYPE_CHECKING:
    from onlinespec.decode.engine import Generation

__all__ = ["Draft", "Proposer", "Copies", "DraftRows", "FeatureRows", "Blocks"]

ENCODE_CHUNK = 256  # positions per row in one forward when a drafter encodes joining rows' text


@dataclass(frozen=True)
class Draft:
    token: int
    q: torch.Tensor | None = None  # the distribution it was drawn from; None: deterministic (one-hot)
    copied: bool = False  # by suffix speculation


class Proposer(Protocol):
    def propose(self, rows: list[Generation], need: list[int], drafts: list[list[int]], position: int,
                room: list[int]) -> dict[int, list[Draft]]:
        """Drafts for the rows ``need`` (indices into ``rows``) at draft ``position`` of this
        step's block; ``drafts[b]`` holds row ``b``'s drafts so far, ``room[b]`` how many more
        it may take."""


class Copies:
    """Copies: the request's predicted output where the answer follows it
    (:mod:`onlinespec.decode.prediction`), else suffix speculation: the token after the longest
    earlier occurrence of the row's text (in its request, or in past outputs of its tenant)."""

    def propose(self, rows, need, drafts, position, room):
        out = {}
        for b in need:
            gen = rows[b]
            if gen.index is not None and position == 0:
                gen.index.extend(gen.tokens)  # settled tokens only: drafts may be rejected
            if gen.prediction is not None:
                token = gen.prediction.propose(gen.generated + drafts[b])
                if token is not None:
                    gen.prediction.block.append(position)
                    out[b] = [Draft(token, None, copied=True)]
                    continue
            if gen.index is None:
                continue
            match = best_match(gen.index, gen.cache, gen.tokens + drafts[b], gen.scope)
            if match is not None:
                out[b] = [Draft(match.token, None, copied=True)]
        return out


class DraftRows:
    """A Hugging Face drafter's keys and values for the rows it drafts for (its own row order),
    and its drafts: one forward per draft position for all of its rows.

    A request joins the first time it is asked to draft (its text so far is encoded then), not
    when it enters the batch: a request its drafter never drafts for (plain steps, a muted
    drafter) costs the drafter nothing. It encodes the last ``context`` tokens of the text (None:
    all) at positions from 0: a drafter with rotary positions drafts as from that window (what
    it attends over is the same relative layout), and joining costs a bounded forward."""

    def joined(self, gen: Generation) -> bool:
        return gen in self.gens

    def __init__(self, drafter: HFDrafter, slots: int, max_len: int, catch_up: int, context: int | None = None):
        self.drafter = drafter
        self.cache = SlotCache.for_model(drafter.model, slots, max_len)
        self.gens: list[Generation] = []
        self.skipped: dict[Generation, int] = {}  # per row: text tokens before its window
        self.catch_up = catch_up  # the most tokens a row feeds in one forward
        self.context = context
        # (seconds, tokens) of each join since the caller last took them: encoding the text of
        # joining rows (reported as prefill, costed apart from drafting)
        self.joins: list[tuple[float, int]] = []

    def join(self, gens: list[Generation]) -> None:
        """Rows new to this drafter take rows of its cache, their text so far encoded together:
        one forward for all of them (per ``ENCODE_CHUNK`` positions), without the head."""
        if not gens:
            return
        t0 = time.perf_counter()
        spans = []
        for gen in gens:
            n = len(gen.tokens) - 1  # all but the last, like the target's cache
            self.skipped[gen] = skip = max(0, n - self.context) if self.context else 0
            spans.append(self._span(gen, skip, n))
        longest = max(end - start for start, end in spans)
        staging = None
        if longest:
            staging = SlotCache.for_model(self.drafter.model, len(gens), self.cache.max_len)
            for _ in gens:
                staging.join()
            for at in range(0, longest, ENCODE_CHUNK):
                chunks = [(min(s + at, e), min(s + at + ENCODE_CHUNK, e)) for s, e in spans]
                forward_rows(self.drafter.model, staging, logits=False, **self._inputs(gens, chunks))
        for i, (gen, (start, end)) in enumerate(zip(gens, spans)):
            row = self.cache.join()
            self.gens.append(gen)
            self._joined(gen, end)
            if end > start:
                self.cache.load(row, staging, end - start, source_row=i)
        self.joins.append((time.perf_counter() - t0, sum(e - s for s, e in spans)))

    def _span(self, gen: Generation, skip: int, n: int) -> tuple[int, int]:
        """The positions of ``gen``'s text a join encodes: its window of the first ``n`` tokens."""
        return skip, n

    def _inputs(self, gens: list[Generation], chunks: list[tuple[int, int]]) -> dict:
        """``forward_rows``' inputs for positions ``chunks[i]`` of each joining row."""
        return {"rows": [g.tokens[a:b] for g, (a, b) in zip(gens, chunks)]}

    def _joined(self, gen: Generation, end: int) -> None:
        """``gen`` joined with positions up to ``end`` encoded."""

    def leave(self, gen: Generation) -> None:
        if gen in self.gens:
            leave_row(self.cache, self.gens, gen)
            del self.skipped[gen]

    def rewind(self, gen: Generation, keep: int) -> None:
        """Keep the first ``keep`` tokens of ``gen``'s text."""
        if gen in self.gens:
            row = self.gens.index(gen)
            self.cache.rewind(row, max(0, min(keep - self.skipped[gen], int(self.cache.lengths[row]))))

    def propose(self, rows, need, drafts, position, room):
        mine = [b for b in need if rows[b].drafter is self.drafter]
        if not mine:
            return {}
        self.join([rows[b] for b in mine if rows[b] not in self.gens])
        where = {id(g): b for b, g in enumerate(rows)}
        # Every row feeds what its cache lacks of its text as of this position (a copy made here
        # is fed at the next forward), at most catch_up tokens: a row whose copies were accepted
        # for many steps catches up over several forwards rather than padding every row to its
        # length, and drafts only once it has.
        feeds, complete = [], set()
        for i, gen in enumerate(self.gens):
            lacking = (gen.tokens + drafts[where[id(gen)]][:position])[self.skipped[gen] + int(self.cache.lengths[i]):]
            feeds.append(lacking[: self.catch_up])
            if 0 < len(lacking) <= self.catch_up:
                complete.add(id(gen))
        logits = forward_rows(self.drafter.model, self.cache, feeds, last=True)
        out = {}
        for b in mine:
            gen = rows[b]
            if id(gen) in complete:
                token, q = _draw(logits[self.gens.index(gen)][-1], gen, drafts[b][:position], position)
                out[b] = [Draft(token, q)]
        return out


def _draw(logits: torch.Tensor, gen: Generation, before: list[int], position: int):
    """A drafter's draft for ``gen`` at ``position`` of its block from its logits ``[V]``: under the
    request's penalties, biases, ``min_tokens`` and structure, as the target will judge it
    (``before``: the block's drafts so far), so such a request is drafted what its target would choose."""
    return draw(gen.judged(logits[None], [], before)[0], gen.params, gen.generator, position=len(gen.tokens) + position)


class FeatureRows(DraftRows):
    """A :class:`~onlinespec.drafters.feature.FeatureDrafter`'s rows: pair ``i`` of a row is the
    target's feature ``h_i`` (kept in the request's :class:`~onlinespec.decode.features.FeatureLog`)
    with token ``x_{i+1}``. Up to the last settled token the pairs hold the target's features;
    past it each draft is paired with the drafter's own output feature of the pair before, one
    pair per forward. After verification a row keeps only its pairs with true features
    (:meth:`rewind`) and catches up on the accepted tokens' at its next forward."""

    def __init__(self, drafter: HFDrafter, slots: int, max_len: int, catch_up: int, context: int | None = None):
        super().__init__(drafter, slots, max_len, catch_up, context)
        self.true: dict[Generation, int] = {}  # pairs 0 .. true-1 hold the target's features
        self.last: dict[Generation, tuple[int, torch.Tensor]] = {}  # (pair, its output feature), the last fed

    def _span(self, gen, skip, n):
        """A join encodes each row's pairs but the last (whose output the first draft needs)."""
        return skip, max(skip, n - 1)

    def _inputs(self, gens, chunks):
        return {"rows": [g.tokens[a + 1:b + 1] for g, (a, b) in zip(gens, chunks)],
                "features": [g.features[a:b] for g, (a, b) in zip(gens, chunks)]}

    def _joined(self, gen, end):
        self.true[gen] = end

    def leave(self, gen: Generation) -> None:
        super().leave(gen)
        self.true.pop(gen, None)
        self.last.pop(gen, None)

    def rewind(self, gen: Generation, keep: int) -> None:
        if gen in self.gens:
            self.true[gen] = min(self.true[gen], keep)
            super().rewind(gen, self.true[gen])

    def propose(self, rows, need, drafts, position, room):
        mine = [b for b in need if rows[b].drafter is self.drafter]
        if not mine:
            return {}
        self.join([rows[b] for b in mine if rows[b] not in self.gens])
        where = {id(g): b for b, g in enumerate(rows)}
        out = {}
        # a row whose previous draft came from a copy lacks that draft's pair too: a second forward
        for _ in range(2):
            feeds, feats, ends = [], [], []
            for i, gen in enumerate(self.gens):
                at = self.skipped[gen] + int(self.cache.lengths[i])  # the next pair
                n = len(gen.tokens) - 1
                text = gen.tokens + drafts[where[id(gen)]][:position]
                if at < n:  # settled pairs: the target's features
                    end = min(n, at + self.catch_up)
                    feeds.append(text[at + 1:end + 1])
                    feats.append(gen.features[at:end])
                elif at + 1 < len(text) and self.last.get(gen, (None,))[0] == at - 1:  # a draft: its own feature
                    end = at + 1
                    feeds.append([text[at + 1]])
                    feats.append(self.last[gen][1][None])
                else:
                    end = at
                    feeds.append([])
                    feats.append(torch.empty(0))
                ends.append(end)
            if not any(feeds):
                break
            logits, states = forward_rows(self.drafter.model, self.cache, feeds, hidden=True, features=feats,
                                          last=True)
            for i, gen in enumerate(self.gens):
                if feeds[i]:
                    self.last[gen] = (ends[i] - 1, states[i][-1])
                    if ends[i] <= len(gen.tokens) - 1:
                        self.true[gen] = ends[i]
            for b in mine:
                gen = rows[b]
                i = self.gens.index(gen)
                if b not in out and feeds[i] and ends[i] == len(gen.tokens) - 1 + position:
                    token, q = _draw(logits[i][-1], gen, drafts[b][:position], position)
                    out[b] = [Draft(token, q)]
            if len(out) == len(mine):
                break
        return out


class Blocks:
    """Any other :class:`~onlinespec.drafters.base.Drafter`: its whole block at the first
    position, from its per-request state."""

    def propose(self, rows, need, drafts, position, room):
        if position != 0:
            return {}
        out = {}
        for b in need:
            gen = rows[b]
            if gen.drafter is None or isinstance(gen.drafter, HFDrafter):
                continue
            block = gen.drafter.propose(gen.dstate, gen.tokens, room[b], gen.params, gen.generator)
            qs = list(block.q) if block.q is not None else [None] * len(block)
            out[b] = [Draft(t, q) for t, q in zip(block.tokens.tolist(), qs)]
        return out
