"""Teacher-forced drafter logits at the generated positions of a feedback batch."""

from __future__ import annotations

import torch

from onlinespec.learn.batch import FeedbackBatch

__all__ = ["drafter_logits", "deeper_logits"]


def drafter_logits(model, batch: FeedbackBatch) -> torch.Tensor:
    """[N, V]: the drafter's logits predicting each generated position from the true prefix."""
    from onlinespec.drafters.feature import FeatureDrafter

    if isinstance(model, FeatureDrafter):
        # pair t = (the target's feature after token t, token t + 1) predicts token t + 2: the
        # position predicting column c's next token is pair c - 1
        if batch.features is None:
            raise ValueError("a feature drafter learns from its records' captured target features "
                             "(serving.capture_features); this batch has none")
        mask = batch.attention_mask[:, 1:]
        out = model.model(inputs_embeds=model.fuse(batch.input_ids[:, 1:], batch.features[:, :-1]),
                          attention_mask=mask)
        return model.lm_head(out.last_hidden_state[batch.row, batch.col - 1])
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden[batch.row, batch.col]  # [N, H]: only the positions we score go through lm_head
    return model.lm_head(picked)


def deeper_logits(model, batch: FeedbackBatch, level: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature drafter's logits at the batch's positions as if drafting ``level + 1`` deep (its
    last ``level`` pairs fed on its own features: :func:`~onlinespec.drafters.feature.unrolled_logits`),
    and the mask of the positions that have that much context ([M, V], [N] bool)."""
    from onlinespec.drafters.feature import unrolled_logits

    outs = unrolled_logits(model, batch.input_ids[:, 1:], batch.features[:, :-1], levels=level + 1)
    valid = batch.col - 1 >= level
    return outs[level][0][batch.row[valid], batch.col[valid] - 1], valid
