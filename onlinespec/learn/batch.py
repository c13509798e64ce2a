"""Feedback records -> tensors for a teacher-forced drafter pass.

For a record with ``prompt_len = P`` and ``G`` generated tokens, the drafter's distribution at
generated position ``i`` comes from its logits at sequence position ``P - 1 + i`` (teacher
forcing on the actual output). The target's side is the logged top-K, plus a rest bucket.

For a feature drafter (:mod:`onlinespec.drafters.feature`) each record comes with its captured
target features (:class:`~onlinespec.feedback.codec.CapturedFeatures`): its sequence starts
where they start, ``features[b, t]`` is the target's feature after token ``t`` of that sequence,
and the pair ``(features[b, t], input_ids[b, t + 1])`` predicts token ``t + 2``: generated
positions keep their column (``P - 1 + i``, the one before them) and need a pair before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from onlinespec.feedback.record import FeedbackRecord

__all__ = ["FeedbackBatch", "collate"]


@dataclass(frozen=True)
class FeedbackBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T]
    row: torch.Tensor  # [N] which sequence each generated position belongs to
    col: torch.Tensor  # [N] the logits column that predicts it
    p_ids: torch.Tensor  # [N, K] target top-K ids
    p_log: torch.Tensor  # [N, K] target top-K log-probs (float32)
    drafted: torch.Tensor  # [N] bool
    accepted: torch.Tensor  # [N] bool
    block_index: torch.Tensor  # [N] int64
    block: torch.Tensor  # [N] int64, a block id unique within the batch
    records: int
    temperature: torch.Tensor  # [N] float32: the sampling temperature of the request (0: greedy)
    features: torch.Tensor | None = None  # [B, T, H] float32: the target's features (feature drafters)

    @property
    def positions(self) -> int:
        return int(self.row.numel())


def collate(records: list[FeedbackRecord], max_len: int = 1024, pad_id: int = 0,
            features: list | None = None) -> FeedbackBatch:
    """Long records keep their last ``max_len`` tokens (generated positions whose context was cut
    away entirely are dropped). ``features``: each record's captured target features (a feature
    drafter's batch; positions without a pair of them are dropped)."""
    assert records, "collate() needs at least one record"
    assert features is None or len(features) == len(records), "one capture per record"
    seqs, rows, cols, ids, logs, dr, ac, bi, blocks, temps, feats = [], [], [], [], [], [], [], [], [], [], []
    block_base = 0
    for b, r in enumerate(records):
        tokens = r.tokens.astype(np.int64)
        cut = max(0, tokens.size - max_len)
        if features is not None:
            cut = max(cut, features[b].start)
            feats.append(features[b].values[cut - features[b].start:])
        seqs.append(tokens[cut:])
        g = r.generated
        col = r.prompt_len - 1 + np.arange(g) - cut
        keep = col >= 0 if features is None else (col >= 1) & (col - 1 < len(feats[-1]))
        block_id = np.cumsum(r.block_index == 0) - 1 + block_base
        block_base = int(block_id.max()) + 1 if g else block_base
        rows.append(np.full(int(keep.sum()), b))
        cols.append(col[keep])
        ids.append(r.topk_ids[keep])
        logs.append(r.topk_logprobs[keep].astype(np.float32))
        dr.append(r.drafted[keep])
        ac.append(r.accepted[keep])
        bi.append(r.block_index[keep].astype(np.int64))
        blocks.append(block_id[keep])
        temps.append(np.full(int(keep.sum()), r.temperature, dtype=np.float32))
    T = max(s.size for s in seqs)
    input_ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for b, s in enumerate(seqs):
        input_ids[b, : s.size] = s
        mask[b, : s.size] = 1
    cat = lambda xs: torch.from_numpy(np.concatenate(xs))  # noqa: E731
    table = None
    if features is not None:
        table = torch.zeros(len(seqs), T, max(f.shape[1] for f in feats), dtype=torch.float32)
        for b, f in enumerate(feats):
            n = min(len(f), T)
            table[b, :n] = torch.from_numpy(f[:n].astype(np.float32))
    return FeedbackBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        row=cat(rows).long(),
        col=cat(cols).long(),
        p_ids=cat(ids).long(),
        p_log=cat(logs).float(),
        drafted=cat(dr).bool(),
        accepted=cat(ac).bool(),
        block_index=cat(bi).long(),
        block=cat(blocks).long(),
        records=len(records),
        temperature=cat(temps).float(),
        features=table,
    )
