"""Teacher-forced drafter logits at the generated positions of a feedback batch."""

from __future__ import annotations

import torch

from onlinespec.learn.batch import FeedbackBatch

__all__ = ["drafter_logits"]


def drafter_logits(model, batch: FeedbackBatch) -> torch.Tensor:
    """[N, V]: the drafter's logits predicting each generated position from the true prefix."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden[batch.row, batch.col]  # [N, H]: only the positions we score go through lm_head
    return model.lm_head(picked)
