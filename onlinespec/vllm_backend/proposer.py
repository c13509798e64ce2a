"""OnlineSpec's drafters as a vLLM proposer (``speculative_config={"method": "custom_class", ...}``).

vLLM calls :meth:`OnlineSpecProposer.propose` after every step with the tokens each request of
the batch emitted (its accepted drafts plus the target's own token) and asks for the next drafts.
For every request the proposer

- learns what happened to its previous drafts: the first ``len(emitted) - 1`` were accepted (vLLM
  emits the accepted prefix of the drafts, then one token of the target's); that block is kept in
  the request's :class:`DraftLog` for the feedback record;
- drafts up to ``k`` tokens greedily with the request's drafter (a Hugging Face model, the same
  object the server's hot-swap watcher swaps), over a key/value cache of its own that is cut back
  to the verified text, never rebuilt, on rejection.

Which drafter drafts for a request, and how many tokens, the server decides when the request
starts (:meth:`assign`, the pool's routing as in the embedded engine); a request with no
assignment, or whose drafter is ``None``, is decoded without drafts. vLLM verifies every draft
against the target over the full vocabulary (its rejection sampler; drafts without draft
probabilities are treated as the n-gram proposer's are), so output is exactly the target's.

The proposer needs the rows' request ids, which vLLM's custom-class call does not pass: the server
hands it the model runner after start-up (:func:`attach`, through vLLM's ``collective_rpc``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["DraftLog", "OnlineSpecProposer", "attach"]

log = logging.getLogger(__name__)


@dataclass
class DraftLog:
    """What happened to one request's drafts, step by step: what the feedback record is built from."""

    drafter_id: str | None
    drafter_version: int
    blocks: list[tuple[list[int], int, int]] = field(default_factory=list)  # (drafts, emitted, accepted) per step
    mismatches: int = 0  # steps whose emitted tokens disagreed with the drafts they claim to accept

    @property
    def drafted(self) -> int:
        return sum(len(d) for d, _, _ in self.blocks)

    @property
    def accepted(self) -> int:
        return sum(a for _, _, a in self.blocks)


@dataclass
class _Row:
    """A request's drafting state: its drafter, k, and the drafter's cache over ``tokens``."""

    drafter: object | None  # HFDrafter
    k: int
    log: DraftLog
    tokens: list[int] = field(default_factory=list)  # what the cache holds keys and values for
    cache: object | None = None
    pending: list[int] = field(default_factory=list)  # drafts handed to vLLM, not yet verified
    new: list = field(default_factory=list)  # (drafted, accepted) of steps not yet taken by the loop


class OnlineSpecProposer:
    """vLLM's custom-class proposer interface: ``__init__(vllm_config)``, ``load_model(target)``,
    ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)``."""

    def __init__(self, vllm_config):
        self.k_max = int(vllm_config.speculative_config.num_speculative_tokens)
        self.runner = None
        self._assigned: dict[str, tuple[object | None, int]] = {}  # vLLM's request id -> (drafter, k)
        self._rows: dict[str, _Row] = {}  # vLLM's request id -> its state
        self._lock = threading.Lock()  # assign/finish come from the server's threads
        self.steps = 0

    def load_model(self, target_model) -> None:  # noqa: ARG002 - the drafters are the server's
        """The drafters are not vLLM's to load: the server assigns them per request."""

    # ------------------------------------------------------------------ server side

    def assign(self, request_id: str, drafter, k: int) -> None:
        """After ``add_request``, before the next step: ``request_id`` (the id vLLM returned) drafts with ``drafter`` (an HFDrafter, or None for
        no drafts), at most ``k`` tokens a step (capped at vLLM's ``num_speculative_tokens``)."""
        with self._lock:
            self._assigned[request_id] = (drafter, max(0, min(int(k), self.k_max)))

    def take(self, request_id: str) -> list[tuple[int, int]]:
        """(drafted, accepted) of the request's steps since the last call: the server's per-step counters."""
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
        return row.log if row is not None else None

    # ------------------------------------------------------------------ vLLM side

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):  # noqa: ARG002
        self.steps += 1
        if self.runner is None:  # before attach(): plain decoding
            return [[] for _ in sampled_token_ids]
        req_ids = self.runner.input_batch.req_ids
        out: list[list[int]] = []
        for i, emitted in enumerate(sampled_token_ids):
            row = self._row(req_ids[i])
            if row is None or not len(emitted):  # unknown request, or a prefill chunk that emitted nothing
                out.append([])
                continue
            emitted = [int(t) for t in emitted]
            drafts, row.pending = row.pending, []
            accepted = len(emitted) - 1 if drafts else 0
            if accepted > len(drafts) or emitted[:accepted] != drafts[:accepted]:
                row.log.mismatches += 1  # not what this proposer drafted (vLLM trimmed the drafts?)
                accepted = _common_prefix(emitted, drafts)
            row.log.blocks.append((drafts, len(emitted), accepted))
            if drafts:
                row.new.append((len(drafts), accepted))
            n = int(num_tokens_no_spec[i])
            if row.drafter is None or row.k == 0:
                out.append([])
                continue
            row.pending = self._draft(row, token_ids_cpu[i, :n], row.k)
            out.append(row.pending)
        return out

    def _row(self, request_id: str) -> _Row | None:
        row = self._rows.get(request_id)
        if row is None:
            with self._lock:
                assigned = self._assigned.get(request_id)
            if assigned is None:
                return None
            drafter, k = assigned
            row = _Row(drafter, k, DraftLog(getattr(drafter, "drafter_id", None), getattr(drafter, "version", 0)))
            self._rows[request_id] = row
        return row

    @torch.inference_mode()
    def _draft(self, row: _Row, context: np.ndarray, k: int) -> list[int]:
        """k greedy drafts after ``context``, the drafter's cache cut back to what the context keeps."""
        from transformers import DynamicCache

        model = row.drafter.model
        context = context.tolist()
        keep = _common_prefix(row.tokens, context)
        if row.cache is None:
            row.cache, row.tokens, keep = DynamicCache(), [], 0
        if keep == len(context):  # all of it cached: re-feed the last token for its logits
            keep -= 1
        if keep < len(row.tokens):
            row.cache.crop(keep - len(row.tokens))  # negative: drop that many positions
            del row.tokens[keep:]
        feed = context[keep:]
        drafts: list[int] = []
        for _ in range(k):
            logits = model(input_ids=torch.tensor([feed], device=model.device), past_key_values=row.cache,
                           use_cache=True).logits[0, -1]
            row.tokens.extend(feed)
            token = int(logits.argmax())
            drafts.append(token)
            feed = [token]
        return drafts


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def attach(worker) -> OnlineSpecProposer | None:
    """Run in vLLM's worker (``collective_rpc``): give the proposer its model runner, return it."""
    runner = worker.model_runner
    proposer = getattr(runner, "drafter", None)
    if isinstance(proposer, OnlineSpecProposer):
        proposer.runner = runner
        return proposer
    return None
