"""OnlineSpec's drafters as a vLLM proposer (``speculative_config={"method": "custom_class", ...}``).

vLLM calls :meth:`OnlineSpecProposer.propose` after every step with the tokens each request of
the batch emitted (its accepted drafts plus the target's own token) and asks for the next drafts.
For every request the proposer

- learns what happened to its previous drafts: the first ``len(emitted) - 1`` were accepted (vLLM
  emits the accepted prefix of the drafts, then one token of the target's); that block is kept in
  the request's :class:`DraftLog` for the feedback record;
- copies up to ``k`` tokens where its own text, or its tenant's past outputs, continue it
  (suffix speculation, when the server sets ``suffix_config``);
- else drafts up to ``k`` tokens greedily with its drafter (a Hugging Face model, the same object
  the server's hot-swap watcher updates in place through vLLM's weight-update API): every
  request drafting with one drafter in one forward per draft position, over the drafter's slot
  cache (:class:`~onlinespec.decode.slots.SlotCache`, as in the embedded engine), whose rows are
  cut back to the verified text, never rebuilt, on rejection.

Which drafter drafts for a request, and its most drafts a step, the server decides when the
request starts (:meth:`assign`, the pool's routing as in the embedded engine). Copies go at that
full length wherever they match; for requests whose length is not fixed, how many tokens the
drafter models draft in a step (0: muted) comes from
:class:`~onlinespec.vllm_backend.steps.StepK`. A request with no assignment is decoded without
drafts. vLLM verifies every draft
against the target over the full vocabulary (its rejection sampler; drafts without draft
probabilities are treated as the n-gram proposer's are), so output is exactly the target's.

The proposer needs the rows' request ids, which vLLM's custom-class call does not pass: the
worker extension hands it the model runner after start-up (:mod:`.worker`), with its drafters.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from onlinespec.vllm_backend.steps import StepK

__all__ = ["DraftLog", "OnlineSpecProposer"]

ENCODE_CHUNK = 256  # text positions a joining request encodes per forward

log = logging.getLogger(__name__)


@dataclass
class DraftLog:
    """What happened to one request's drafts, step by step: what the feedback record is built from."""

    drafter_id: str | None
    drafter_version: int
    blocks: list[tuple[list[int], int, int]] = field(default_factory=list)  # (drafts, emitted, accepted) per step
    copied_blocks: int = 0  # of the blocks with drafts, those copied by suffix speculation
    mismatches: int = 0  # steps whose emitted tokens disagreed with the drafts they claim to accept
    start: int | None = None  # the request's text length (prompt included) before the first block

    @property
    def drafted(self) -> int:
        return sum(len(d) for d, _, _ in self.blocks)

    @property
    def accepted(self) -> int:
        return sum(a for _, _, a in self.blocks)


@dataclass
class _Row:
    """A request's drafting state: its drafter, k, what happened to its drafts."""

    drafter: object | None  # HFDrafter
    k: int
    log: DraftLog
    adaptive: bool = False  # k is an upper bound; the step's length comes from StepK
    scope: object = None  # whose past outputs it may copy from (its tenant)
    isolated: bool = False  # copies from its own text only
    index: object | None = None  # RequestIndex over its settled text (suffix speculation)
    pending: list[int] = field(default_factory=list)  # drafts handed to vLLM, not yet verified
    copied: bool = False  # the pending drafts are copies, not the drafter's
    last_step: int = -1  # the proposer call that last saw it emit
    new: list = field(default_factory=list)  # (drafted, accepted, copied) of steps not yet taken by the loop


class _Rows:
    """One drafter's keys and values for the requests it drafts for (a slot cache: one forward per
    draft position for all of them). A request joins the first time it drafts (its text encoded
    then, without the head); at each step its row is cut back to what vLLM verified, fed what it
    lacks, then drafts."""

    def __init__(self, drafter, slots: int, max_len: int):
        from onlinespec.decode.slots import SlotCache

        self.drafter = drafter
        self.cache = SlotCache.for_model(drafter.model, slots, max_len)
        self.owners: list[str] = []  # request ids in row order
        self.held: dict[str, list[int]] = {}  # the tokens each row holds keys and values for

    def leave(self, request_id: str) -> None:
        from onlinespec.decode.slots import leave_row

        if request_id in self.held:
            leave_row(self.cache, self.owners, request_id)
            del self.held[request_id]

    @torch.inference_mode()
    def draft(self, contexts: dict[str, list[int]], ks: dict[str, int]) -> dict[str, list[int]]:
        """Greedy drafts, ``ks[r]`` of them, after each request's text ``contexts[r]``."""
        from onlinespec.decode.slots import SlotCache, forward_rows

        model = self.drafter.model
        feeds: dict[str, list[int]] = {}
        joining = []
        for rid, context in contexts.items():
            held = self.held.get(rid)
            if held is not None:
                keep = min(_common_prefix(held, context), len(context) - 1)
                if len(context) - keep > ENCODE_CHUNK:  # far behind (preempted and back): start afresh
                    self.leave(rid)
                    held = None
            if held is None:
                joining.append(rid)
                continue
            row = self.owners.index(rid)
            self.cache.rewind(row, keep)
            del held[keep:]
            feeds[rid] = context[keep:]
        if joining:  # their text but the last token, encoded together in a cache of their own
            texts = [contexts[rid][:-1] for rid in joining]
            staging = SlotCache.for_model(model, len(joining), self.cache.max_len)
            for _ in joining:
                staging.join()
            for start in range(0, max(map(len, texts)), ENCODE_CHUNK):
                forward_rows(model, staging, [t[start:start + ENCODE_CHUNK] for t in texts], logits=False)
            for i, rid in enumerate(joining):
                row = self.cache.join()
                self.owners.append(rid)
                self.cache.load(row, staging, len(texts[i]), source_row=i)
                self.held[rid] = list(texts[i])
                feeds[rid] = contexts[rid][-1:]
        drafts: dict[str, list[int]] = {rid: [] for rid in contexts}
        for position in range(max(ks.values(), default=0)):
            rows = [feeds.get(rid, []) if len(drafts.get(rid, ())) < ks.get(rid, 0) else [] for rid in self.owners]
            if not any(rows):
                break
            logits = forward_rows(model, self.cache, rows)
            for b, rid in enumerate(self.owners):
                if rows[b]:
                    self.held[rid].extend(rows[b])
                    token = int(logits[b][-1].argmax())
                    drafts[rid].append(token)
                    feeds[rid] = [token]
        return drafts


class OnlineSpecProposer:
    """vLLM's custom-class proposer interface: ``__init__(vllm_config)``, ``load_model(target)``,
    ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)``."""

    def __init__(self, vllm_config):
        self.k_max = int(vllm_config.speculative_config.num_speculative_tokens)
        self.runner = None
        self._assigned: dict[str, tuple] = {}  # vLLM's request id -> (drafter, k, adaptive, scope, isolated)
        self.suffix = None  # SuffixCache: suffix speculation over past outputs (set by the server)
        self.suffix_config = None  # SuffixConfig: copies at all (None: the drafters alone)
        self._rows: dict[str, _Row] = {}  # vLLM's request id -> its state
        self._lock = threading.Lock()  # assign/finish come from the server's threads
        self._drafting: dict[int, _Rows] = {}  # id(drafter) -> its rows
        self.slots = int(vllm_config.scheduler_config.max_num_seqs)
        self.max_len = int(vllm_config.model_config.max_model_len)
        self.steps = 0
        self.failures = 0  # drafting calls that raised (their rows went without drafts)
        self.step_k = StepK(self.k_max)
        # the step under way: (rows, drafter length, start, rows drafting with the model or None when the
        # length was not a choice, draft tokens handed to vLLM, drafter seconds)
        self._mark: tuple | None = None

    def load_model(self, target_model) -> None:  # noqa: ARG002 - the drafters are the server's
        """The drafters are not vLLM's to load: the server gives them (:meth:`serve`) and assigns
        them per request."""

    def serve(self, drafters: dict) -> None:
        """The server's drafters (id -> HFDrafter) become vLLM's draft model (``self.model``,
        :class:`~onlinespec.vllm_backend.transfer.DrafterModules`): what vLLM's
        ``start_draft_weight_update`` targets, and the ``onlinespec`` transfer backend updates in
        place. Set after vLLM started (vLLM wraps a draft model it finds at start-up for CUDA
        graphs, which these Hugging Face modules are not built for)."""
        from onlinespec.drafters.feature import is_feature
        from onlinespec.errors import ModelLoadError
        from onlinespec.vllm_backend.transfer import DrafterModules

        features = sorted(i for i, d in drafters.items() if is_feature(d.model))
        if features:  # it would need vLLM's hidden states at every step: not wired
            raise ModelLoadError(f"feature drafters ({', '.join(features)}) draft from the target's hidden states, "
                                 "which the vLLM engine does not hand OnlineSpec's proposer: serve them with "
                                 "serving.engine: embedded")
        self.model = DrafterModules(drafters)

    # ------------------------------------------------------------------ server side

    def assign(self, request_id: str, drafter, k: int, adaptive: bool = False, scope: object = None,
               isolated: bool = False) -> None:
        """After ``add_request``, before the next step: ``request_id`` (the id vLLM returned) drafts
        with ``drafter`` (an HFDrafter, or None for no drafts), ``k`` tokens a step (capped at vLLM's
        ``num_speculative_tokens``); ``adaptive``: at most ``k``, as many as :class:`StepK` finds
        pays at the batch's size (0: plain decoding). ``scope``: whose past outputs suffix
        speculation may copy from (its tenant; None: shared); ``isolated``: only from its own text."""
        with self._lock:
            self._assigned[request_id] = (drafter, max(0, min(int(k), self.k_max)), adaptive, scope, isolated)

    def take(self, request_id: str) -> list[tuple[int, int, bool]]:
        """(drafted, accepted, copied) of the request's steps since the last call: the server's per-step counters."""
        row = self._rows.get(request_id)
        if row is None:
            return []
        out, row.new = row.new, []
        return out

    def finish(self, request_id: str) -> DraftLog | None:
        """The request's draft log; its state is dropped (after vLLM reported it finished)."""
        with self._lock:
            self._assigned.pop(request_id, None)
            row = self._rows.pop(request_id, None)
        for rows in self._drafting.values():
            rows.leave(request_id)
        return row.log if row is not None else None

    # ------------------------------------------------------------------ vLLM side

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):  # noqa: ARG002
        self.steps += 1
        now = time.perf_counter()
        if self.runner is None:  # before the worker's setup: plain decoding
            return [[] for _ in sampled_token_ids]
        mark, self._mark = self._mark, None  # the step just done, if its drafter length was a choice
        other_tokens, blocks = 0, []  # what it yielded: the other rows' tokens, the drafter's blocks
        req_ids = self.runner.input_batch.req_ids
        wanted: dict[int, tuple[str, _Row]] = {}  # batch index -> (request, row) that drafts now
        for i, emitted in enumerate(sampled_token_ids):
            rid = req_ids[i]
            row = self._row(rid)
            if row is None or not len(emitted):  # unknown request, or a prefill chunk that emitted nothing
                continue
            emitted = [int(t) for t in emitted]
            drafts, row.pending = row.pending, []
            copied, row.copied = row.copied, False
            if row.last_step != self.steps - 1:  # it was out of the batch (preempted): vLLM dropped its drafts
                drafts = []
            row.last_step = self.steps
            accepted = len(emitted) - 1 if drafts else 0
            if accepted > len(drafts) or emitted[:accepted] != drafts[:accepted]:
                row.log.mismatches += 1  # not what this proposer drafted (vLLM trimmed the drafts?)
                accepted = _common_prefix(emitted, drafts)
            if row.log.start is None:  # the first step this proposer saw (the request's first, unless it
                row.log.start = int(num_tokens_no_spec[i]) - len(emitted)  # was assigned late)
            row.log.blocks.append((drafts, len(emitted), accepted))
            if mark is not None and mark[3] is not None:
                if rid not in mark[3]:
                    other_tokens += len(emitted)
                elif drafts and not copied:
                    blocks.append((len(drafts), accepted))
            if drafts:
                row.new.append((len(drafts), accepted, copied))
                row.log.copied_blocks += copied
            if (row.drafter is not None or row.index is not None) and row.k > 0:
                wanted[i] = (rid, row)
        if mark is not None:  # every step teaches the cost of verifying drafts; a choice, what it yielded
            batch, k, start, choice, drafts_out, drafter_seconds = mark
            if choice is not None:
                other_tokens += sum(len(e) for i, e in enumerate(sampled_token_ids) if req_ids[i] not in self._rows)
            self.step_k.observe(batch, k, now - start, other_tokens if choice is not None else None, blocks,
                                drafts=drafts_out, drafter_seconds=drafter_seconds)
        present = set(req_ids)
        for rows in self._drafting.values():  # rows of requests vLLM no longer runs (preempted, aborted)
            for rid in [r for r in rows.owners if r not in present]:
                rows.leave(rid)  # a preempted request rejoins when it comes back
        # copies first (cheap: no forward), at the longest length a row may use
        room: dict[int, int] = {}  # batch index -> the most drafts it may get
        copies: dict[int, list[int]] = {}
        for i, (_, row) in wanted.items():
            room[i] = max(0, min(row.k, self.max_len - int(num_tokens_no_spec[i])))  # never past vLLM's longest sequence
            if row.index is not None and room[i]:  # text already written that continues this one
                context = token_ids_cpu[i, :int(num_tokens_no_spec[i])].tolist()
                row.index.extend(context)
                copies[i] = self._copies(row, context, room[i])
        # copies go at full length (no forward to pay for); the drafter model's length, for the
        # rows nothing copies for, from what each length measured at this batch size
        step_k = None
        modelled = {rid for i, (rid, row) in wanted.items()
                    if row.adaptive and not copies.get(i) and row.drafter is not None and room[i]}
        if modelled:
            step_k = self.step_k.choose(len(sampled_token_ids), len(modelled),
                                        copied=sum(len(c) for c in copies.values()))
        by_drafter: dict[int, list[int]] = {}
        ks: dict[int, int] = {}  # batch index -> drafts this step
        drafter_seconds = 0.0
        for i, (_, row) in wanted.items():
            if copies.get(i):
                ks[i] = room[i]
                row.pending, row.copied = copies[i], True
                continue
            ks[i] = min(room[i], step_k or 0) if row.adaptive else room[i]
            if ks[i] and row.drafter is not None:
                by_drafter.setdefault(id(row.drafter), []).append(i)
        for indices in by_drafter.values():
            drafter = wanted[indices[0]][1].drafter
            rows = self._drafting.get(id(drafter))
            if rows is None:
                rows = self._drafting[id(drafter)] = _Rows(drafter, self.slots, self.max_len)
            contexts = {wanted[i][0]: token_ids_cpu[i, :int(num_tokens_no_spec[i])].tolist() for i in indices}
            t0 = time.perf_counter()
            try:
                drafts = rows.draft(contexts, {wanted[i][0]: ks[i] for i in indices})
            except Exception:  # noqa: BLE001 - a drafter that fails must not stop vLLM's step
                # its rows decode plainly this step; its cache is rebuilt from their text next time
                self.failures += 1
                log.exception("drafter %s failed to draft (%d so far); its rows decode without drafts",
                              getattr(drafter, "drafter_id", "?"), self.failures)
                del self._drafting[id(drafter)]
                drafts = {}
            for i in indices:
                rid, row = wanted[i]
                row.pending = drafts.get(rid, [])
            drafter_seconds += time.perf_counter() - t0
        out = [wanted[i][1].pending if i in wanted else [] for i in range(len(sampled_token_ids))]
        self._mark = (len(sampled_token_ids), step_k or 0, now, modelled if step_k is not None else None,
                      sum(len(d) for d in out), drafter_seconds)
        return out

    def _copies(self, row: _Row, context: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens copied where the request's own text, or past outputs of its scope,
        continue its last n-gram (each copy extends the context the next one matches)."""
        from onlinespec.decode.suffix import best_match

        out: list[int] = []
        while len(out) < k:
            match = best_match(row.index, None if row.isolated else self.suffix, context + out, row.scope)
            if match is None:
                break
            out.append(match.token)
        return out

    def _row(self, request_id: str) -> _Row | None:
        row = self._rows.get(request_id)
        if row is None:
            with self._lock:
                assigned = self._assigned.get(request_id)
            if assigned is None:
                return None
            drafter, k, adaptive, scope, isolated = assigned
            row = _Row(drafter, k, DraftLog(getattr(drafter, "drafter_id", None), getattr(drafter, "version", 0)),
                       adaptive=adaptive, scope=scope, isolated=isolated)
            if self.suffix_config is not None:
                from onlinespec.decode.suffix import RequestIndex

                row.index = RequestIndex(self.suffix_config)
            self._rows[request_id] = row
        return row


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n

