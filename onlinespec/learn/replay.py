"""Greedy speculative decoding replayed without the target: for benchmarks and tuning.

With greedy verification the output is the target's greedy continuation whatever the drafter
proposes, and a drafted token is accepted iff it equals that continuation. A block that
starts at position ``i`` therefore accepts the run of consecutive positions ``j >= i`` where
the drafter's teacher-forced argmax equals the target's token (capped at ``k``): drafting
``d1`` given the true prefix is the teacher-forced argmax at ``i``, and ``d2`` only matters
once ``d1`` was accepted, i.e. when its prefix is the true prefix again. So one target decode
per prompt (cached across methods) and one drafter forward per round replay exactly what the
engine would have done, records included.

A feature drafter (:mod:`onlinespec.drafters.feature`) drafts past a block's first position on
its own output features, so its draft at block position ``j`` is its teacher-forced argmax
``j`` levels deep (:func:`~onlinespec.drafters.feature.unrolled_logits`): the traces then carry
the target's features (``trace_target(features=True)``) and predictions have one row per level.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import torch

from onlinespec.decode.engine import EngineConfig, GenerationStats, SpeculativeEngine
from onlinespec.feedback.codec import CapturedFeatures
from onlinespec.feedback.record import FeedbackRecord
from onlinespec.learn.batch import collate
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import RequestIndex, SuffixCache, best_match

__all__ = ["TargetTrace", "trace_target", "replay_greedy", "replay_served", "predictions"]


@dataclass(frozen=True)
class TargetTrace:
    """The target's greedy continuation of a prompt and its top-K log-probs at each position."""

    domain: str
    prompt: list[int]
    generated: list[int]
    topk_ids: np.ndarray  # int32 [G, K]
    topk_logprobs: np.ndarray  # float16 [G, K]
    # the target's features as served (float32: what drafting reads), from feature_window tokens
    # before the output; None unless traced with features=True
    features: CapturedFeatures | None = None


def trace_target(target, prompt: list[int], max_new_tokens: int, topk: int, domain: str = "",
                 eos_token_ids: set[int] | None = None, ignore_eos: bool = False,
                 features: bool = False) -> TargetTrace:
    engine = SpeculativeEngine(target, None, config=EngineConfig(feedback_topk=topk,
                                                                 capture_features=1.0 if features else 0.0),
                               eos_token_ids=eos_token_ids)
    gen = engine.start(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))
    while not gen.finished:
        gen.step()
    record = gen.result().record
    return TargetTrace(domain, list(prompt), record.tokens[record.prompt_len:].tolist(),
                       record.topk_ids, record.topk_logprobs, gen.captured_features(torch.float32))


@torch.no_grad()
def _drafter_argmax(drafter, traces: list[TargetTrace], levels: int = 1) -> list[np.ndarray]:
    """Teacher-forced drafter argmax predicting each generated position, per trace: ``[levels, G]``,
    row ``j`` the draft made there as block position ``j`` (the same row repeated, except for a
    feature drafter; -1 where a feature drafter has no pairs that deep)."""
    from onlinespec.drafters.feature import is_feature, unrolled_logits
    from onlinespec.drafters.logits import argmax
    from onlinespec.learn.forward import drafter_logits

    fake = [_record(t, np.zeros(len(t.generated), bool), np.zeros(len(t.generated), bool),
                    np.zeros(len(t.generated), np.int16), np.full(len(t.generated), -1, np.int32), "", 0)
            for t in traces]
    if not is_feature(drafter):
        batch = collate(fake)
        best = argmax(drafter_logits(drafter, batch)).numpy()
        out, start = [], 0
        for t in traces:
            out.append(np.repeat(best[None, start:start + len(t.generated)], levels, axis=0))
            start += len(t.generated)
        return out
    if any(t.features is None for t in traces):
        raise ValueError("a feature drafter drafts from the target's features: trace the prompts with "
                         "trace_target(..., features=True)")
    out = []
    for t, record in zip(traces, fake):  # one at a time: every level's logits are [T, V]
        batch = collate([record], max_len=len(record.tokens), features=[t.features])
        outs = unrolled_logits(drafter, batch.input_ids[:, 1:], batch.features[:, :-1], levels=levels)
        best = np.full((levels, len(t.generated)), -1, np.int64)
        at = (batch.col + t.features.start - (len(t.prompt) - 1)).numpy()  # generated position of each
        for level, (logits, _) in enumerate(outs):
            valid = (batch.col - 1 >= level).numpy()
            best[level, at[valid]] = logits[0, batch.col[valid] - 1].argmax(-1).numpy()
        out.append(best)
    return out


def _record(t: TargetTrace, drafted, accepted, block_index, draft_tokens, drafter_id, version) -> FeedbackRecord:
    return FeedbackRecord(
        request_id=uuid.uuid4().hex, target_id="replay", drafter_id=drafter_id, drafter_version=version,
        created=0.0, temperature=0.0, top_p=1.0, top_k=0,
        tokens=np.asarray(t.prompt + t.generated, dtype=np.int32), prompt_len=len(t.prompt),
        topk_ids=t.topk_ids, topk_logprobs=t.topk_logprobs, drafted=drafted, accepted=accepted,
        block_index=block_index, draft_tokens=draft_tokens,
    )


def _copied(t: TargetTrace, suffix: SuffixCache, scope) -> np.ndarray:
    """Per generated position, the token suffix speculation copies there (-1: none, the drafter drafts).

    A draft is only ever judged at a position whose prefix is the target's own text, so the
    engine's lookups are these, made along the true sequence.
    """
    index = RequestIndex(suffix.config)
    context = list(t.prompt)
    out = np.full(len(t.generated), -1, np.int64)
    for j, token in enumerate(t.generated):
        index.extend(context)
        match = best_match(index, suffix, context, scope)
        if match is not None:
            out[j] = match.token
        context.append(token)
    return out


def predictions(drafter, traces: list[TargetTrace], suffix: SuffixCache | None = None,
                scope=None, levels: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per trace, (the token served at each generated position given the true prefix ``[levels, G]``,
    row ``j`` as a block's ``j``-th draft, whether suffix speculation copied it ``[G]``): what
    greedy verification judges, position by position. ``levels``: the longest block replayed
    (a feature drafter's drafts differ by depth; others' rows are equal)."""
    out = []
    for t, guess in zip(traces, _drafter_argmax(drafter, traces, levels)):
        copied = np.zeros(len(t.generated), bool)
        if suffix is not None:
            lookup = _copied(t, suffix, scope)
            copied = lookup >= 0
            guess = np.where(copied, lookup, guess)
        out.append((guess, copied))
    return out


def replay_greedy(drafter, traces: list[TargetTrace], k: int, drafter_id: str = "replay",
                  version: int = 0, suffix: SuffixCache | None = None,
                  scope=None) -> tuple[list[FeedbackRecord], GenerationStats]:
    """(records, stats) the engine would produce serving ``traces`` greedily with fixed ``k``;
    the stats are summed over the traces and carry no timings.

    ``suffix``: serve with suffix speculation over this cache as it is now; the caller adds the
    outputs (``suffix.add_output``) when their requests would have finished. ``stats.copied``
    then counts the copied drafts the target judged (accepted or first rejected): which drafts
    after a rejection were copied depends on the rejected token, which a replay never sees.
    """
    return replay_served(traces, predictions(drafter, traces, suffix, scope, levels=k), k, drafter_id, version)


def replay_served(traces: list[TargetTrace], served: list[tuple[np.ndarray, np.ndarray]], k: int,
                  drafter_id: str = "replay", version: int = 0) -> tuple[list[FeedbackRecord], GenerationStats]:
    """:func:`replay_greedy` from :func:`predictions` already made (a caller that also scores them)."""
    records, stats = [], GenerationStats()
    for t, (guess, copied) in zip(traces, served):
        g = len(t.generated)
        guess = np.atleast_2d(guess)
        depth = len(guess)
        match = guess == np.asarray(t.generated)
        drafted = np.zeros(g, bool)
        accepted = np.zeros(g, bool)
        block_index = np.zeros(g, np.int16)
        draft_tokens = np.full(g, -1, np.int32)
        i = 0
        while i < g:
            m = min(k, g - 1 - i)  # the engine never drafts past max_new_tokens - 1
            n = 0
            while n < m and match[min(n, depth - 1), i + n]:
                n += 1
            # positions i .. i+n-1 accepted; i+n is the target's token (a correction if n < m)
            for j in range(min(n + 1, g - i)):
                block_index[i + j] = j
                if j < m:
                    drafted[i + j] = True
                    draft_tokens[i + j] = guess[min(j, depth - 1), i + j]
                    accepted[i + j] = j < n
            stats.add(m, n, 0.0, 0.0)
            # drafts past a rejection were drafted after a wrong token: only judged ones are known here
            stats.copied += int(copied[i:i + min(n + 1, m)].sum())
            stats.copied_accepted += int(copied[i:i + n].sum())
            stats.own_judged += min(n + 1, m) - int(copied[i:i + min(n + 1, m)].sum())
            i += n + 1
        records.append(_record(t, drafted, accepted, block_index, draft_tokens, drafter_id, version))
    return records, stats
