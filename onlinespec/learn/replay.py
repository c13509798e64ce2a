"""Greedy speculative decoding replayed without the target: for benchmarks and tuning.

With greedy verification the output is the target's greedy continuation whatever the drafter
proposes, and a drafted token is accepted iff it equals that continuation. A block that
starts at position ``i`` therefore accepts the run of consecutive positions ``j >= i`` where
the drafter's teacher-forced argmax equals the target's token (capped at ``k``): drafting
``d1`` given the true prefix is the teacher-forced argmax at ``i``, and ``d2`` only matters
once ``d1`` was accepted, i.e. when its prefix is the true prefix again. So one target decode
per prompt (cached across methods) and one drafter forward per round replay exactly what the
engine would have done, records included.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import torch

from onlinespec.decode.engine import EngineConfig, GenerationStats, SpeculativeEngine
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


def trace_target(target, prompt: list[int], max_new_tokens: int, topk: int, domain: str = "",
                 eos_token_ids: set[int] | None = None, ignore_eos: bool = False) -> TargetTrace:
    engine = SpeculativeEngine(target, None, config=EngineConfig(feedback_topk=topk), eos_token_ids=eos_token_ids)
    record = engine.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)).record
    return TargetTrace(domain, list(prompt), record.tokens[record.prompt_len:].tolist(),
                       record.topk_ids, record.topk_logprobs)


@torch.no_grad()
def _drafter_argmax(drafter, traces: list[TargetTrace]) -> list[np.ndarray]:
    """Teacher-forced drafter argmax predicting each generated position, per trace."""
    from onlinespec.learn.forward import drafter_logits

    fake = [_record(t, np.zeros(len(t.generated), bool), np.zeros(len(t.generated), bool),
                    np.zeros(len(t.generated), np.int16), np.full(len(t.generated), -1, np.int32), "", 0)
            for t in traces]
    batch = collate(fake)
    best = drafter_logits(drafter, batch).argmax(-1).numpy()
    out, start = [], 0
    for t in traces:
        out.append(best[start:start + len(t.generated)])
        start += len(t.generated)
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
                scope=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per trace, (the token served at each generated position given the true prefix, whether
    suffix speculation copied it): what greedy verification judges, position by position."""
    out = []
    for t, guess in zip(traces, _drafter_argmax(drafter, traces)):
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
    return replay_served(traces, predictions(drafter, traces, suffix, scope), k, drafter_id, version)


def replay_served(traces: list[TargetTrace], served: list[tuple[np.ndarray, np.ndarray]], k: int,
                  drafter_id: str = "replay", version: int = 0) -> tuple[list[FeedbackRecord], GenerationStats]:
    """:func:`replay_greedy` from :func:`predictions` already made (a caller that also scores them)."""
    records, stats = [], GenerationStats()
    for t, (guess, copied) in zip(traces, served):
        g = len(t.generated)
        truth = np.asarray(t.generated)
        match = guess == truth
        drafted = np.zeros(g, bool)
        accepted = np.zeros(g, bool)
        block_index = np.zeros(g, np.int16)
        draft_tokens = np.full(g, -1, np.int32)
        i = 0
        while i < g:
            m = min(k, g - 1 - i)  # the engine never drafts past max_new_tokens - 1
            n = 0
            while n < m and match[i + n]:
                n += 1
            # positions i .. i+n-1 accepted; i+n is the target's token (a correction if n < m)
            for j in range(min(n + 1, g - i)):
                block_index[i + j] = j
                if j < m:
                    drafted[i + j] = True
                    draft_tokens[i + j] = guess[i + j]
                    accepted[i + j] = j < n
            stats.add(m, n, 0.0, 0.0)
            # drafts past a rejection were drafted after a wrong token: only judged ones are known here
            stats.copied += int(copied[i:i + min(n + 1, m)].sum())
            stats.copied_accepted += int(copied[i:i + n].sum())
            i += n + 1
        records.append(_record(t, drafted, accepted, block_index, draft_tokens, drafter_id, version))
    return records, stats
