"""Feedback records -> tensors for a teacher-forced drafter pass.

For a record with ``prompt_len = P`` and ``G`` generated tokens, the drafter's distribution at
generated position ``i`` comes from its logits at sequence position ``P - 1 + i`` (teacher
forcing on the actual output). The target's side is the logged top-K, plus a rest bucket.
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

    @property
    def positions(self) -> int:
        return int(self.row.numel())


def collate(records: list[FeedbackRecord], max_len: int = 1024, pad_id: int = 0) -> FeedbackBatch:
    """Long records keep their last ``max_len`` tokens (generated positions whose context was cut
    away entirely are dropped)."""
    assert records, "collate() needs at least one record"
    seqs, rows, cols, ids, logs, dr, ac, bi, blocks, temps = [], [], [], [], [], [], [], [], [], []
    block_base = 0
    for b, r in enumerate(records):
        tokens = r.tokens.astype(np.int64)
        cut = max(0, tokens.size - max_len)
        seqs.append(tokens[cut:])
        g = r.generated
        col = r.prompt_len - 1 + np.arange(g) - cut
        keep = col >= 0
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
    )
