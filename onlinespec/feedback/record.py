"""The feedback record: what one request taught us about the drafter, at no extra target cost.

For each generated position ``i`` (sequence position ``prompt_len + i``) the record keeps the
target's top-K token ids and log-probabilities there, as computed during verification (raw
log-softmax of the target's logits: temperature 1, no cuts; the request's sampling settings
are kept beside them), plus what happened at that position:

- ``drafted``: a draft token was proposed here (``draft_tokens[i]``, else -1);
- ``accepted``: that draft was accepted, so the output token is the drafted one;
- otherwise the target produced the token (a correction after a rejection, a bonus token after
  a fully accepted block, or a plain target step);
- ``block_index``: the index inside the draft block (0 for the first position of a step).

With top-K truncation, losses use K+1 buckets: the K ids and one "rest" bucket whose target
mass is ``rest_mass``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SCHEMA_VERSION", "FeedbackRecord", "RecordBuilder"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    target_id: str
    drafter_id: str
    drafter_version: int
    created: float
    temperature: float
    top_p: float
    top_k: int
    tokens: np.ndarray  # int32 [prompt_len + G]
    prompt_len: int
    topk_ids: np.ndarray  # int32 [G, K]
    topk_logprobs: np.ndarray  # float16 [G, K]
    drafted: np.ndarray  # bool [G]
    accepted: np.ndarray  # bool [G]
    block_index: np.ndarray  # int16 [G]
    draft_tokens: np.ndarray  # int32 [G], -1 where nothing was drafted
    tenant: str | None = None
    domain: str | None = None  # the request's declared traffic group (``metadata.domain``)
    schema: int = SCHEMA_VERSION

    @property
    def generated(self) -> int:
        return int(self.tokens.size - self.prompt_len)

    @property
    def rest_mass(self) -> np.ndarray:
        """Target probability outside the logged top-K, per position: float32 [G]."""
        return np.clip(1.0 - np.exp(self.topk_logprobs.astype(np.float32)).sum(-1), 0.0, 1.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError when fields disagree in type, length or value, or (with
        ``vocab_size``) name a token id outside the vocabulary."""
        g = self.generated
        checks = [
            (g >= 1, "no generated positions"),
            (self.schema == SCHEMA_VERSION, f"schema {self.schema} != {SCHEMA_VERSION}"),
            (self.tokens.dtype == np.int32 and self.tokens.ndim == 1, "tokens must be int32 [N]"),
            (0 < self.prompt_len <= self.tokens.size, "prompt_len out of range"),
            (self.topk_ids.dtype == np.int32 and self.topk_ids.shape[:1] == (g,) and self.topk_ids.ndim == 2,
             "topk_ids must be int32 [G, K]"),
            (self.topk_logprobs.dtype == np.float16 and self.topk_logprobs.shape == self.topk_ids.shape,
             "topk_logprobs must be float16 [G, K]"),
            (all(a.shape == (g,) for a in (self.drafted, self.accepted, self.block_index, self.draft_tokens)),
             "per-position flags must have G entries"),
            (self.drafted.dtype == np.bool_ and self.accepted.dtype == np.bool_, "flags must be bool"),
            (self.block_index.dtype == np.int16 and self.draft_tokens.dtype == np.int32, "bad flag dtypes"),
            (bool(np.all(np.isfinite(self.topk_logprobs))) and bool(np.all(self.topk_logprobs <= 1e-3)),
             "log-probs must be finite and <= 0"),
            (bool(np.all(self.drafted | ~self.accepted)), "accepted position that was not drafted"),
            (bool(np.all((self.draft_tokens >= 0) == self.drafted)), "draft_tokens disagree with drafted"),
            (bool(np.all(self.draft_tokens[self.accepted] == self.tokens[self.prompt_len:][self.accepted])),
             "accepted draft differs from the output token"),
            (self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0, "bad sampling settings"),
            (self.topk_ids.ndim == 2 and self.topk_ids.shape[-1] >= 1, "no top-K log-probs"),
            (bool(np.all(self.tokens >= 0)) and bool(np.all(self.topk_ids >= 0)), "negative token id"),
            (bool(np.all(self.block_index >= 0)), "negative block index"),
        ]
        if vocab_size is not None:
            top = max(int(self.tokens.max(initial=0)), int(self.topk_ids.max(initial=0)),
                      int(self.draft_tokens.max(initial=-1)))
            checks.append((top < vocab_size, f"token id {top} outside the vocabulary of {vocab_size}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid feedback record {self.request_id!r}: {message}")


@dataclass
class RecordBuilder:
    """Collects per-position feedback while a request runs; ``build()`` freezes it."""

    prompt: list[int]
    target_id: str
    drafter_id: str
    drafter_version: int
    sampling: dict
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str | None = None
    domain: str | None = None
    ids: list[np.ndarray] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    drafted: list[bool] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    block_index: list[int] = field(default_factory=list)
    draft_tokens: list[int] = field(default_factory=list)

    def add_block(self, ids: np.ndarray, logprobs: np.ndarray, drafts: list[int], n_accepted: int, n_emitted: int):
        """One engine step: rows [n_emitted, K] of top-K for the emitted positions, the drafts
        proposed (``m`` of them) and how many were accepted."""
        self.ids.append(ids[:n_emitted])
        self.logprobs.append(logprobs[:n_emitted])
        for j in range(n_emitted):
            was_drafted = j < len(drafts)
            self.drafted.append(was_drafted)
            self.accepted.append(j < n_accepted)
            self.block_index.append(j)
            self.draft_tokens.append(drafts[j] if was_drafted else -1)

    def build(self, generated: list[int]) -> FeedbackRecord:
        k = self.ids[0].shape[1] if self.ids else 0
        record = FeedbackRecord(
            request_id=self.request_id,
            target_id=self.target_id,
            drafter_id=self.drafter_id,
            drafter_version=self.drafter_version,
            created=time.time(),
            temperature=float(self.sampling["temperature"]),
            top_p=float(self.sampling["top_p"]),
            top_k=int(self.sampling["top_k"]),
            tokens=np.asarray(self.prompt + generated, dtype=np.int32),
            prompt_len=len(self.prompt),
            topk_ids=np.concatenate(self.ids).astype(np.int32) if self.ids else np.zeros((0, k), np.int32),
            topk_logprobs=np.concatenate(self.logprobs).astype(np.float16) if self.logprobs else np.zeros((0, k), np.float16),
            drafted=np.asarray(self.drafted, dtype=bool),
            accepted=np.asarray(self.accepted, dtype=bool),
            block_index=np.asarray(self.block_index, dtype=np.int16),
            draft_tokens=np.asarray(self.draft_tokens, dtype=np.int32),
            tenant=self.tenant,
            domain=self.domain,
        )
        record.validate()
        return record
