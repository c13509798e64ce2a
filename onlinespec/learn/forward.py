"""Teacher-forced drafter logits at the generated positions of a feedback batch.

A drafter with a reduced head gives them unexpanded (:class:`~onlinespec.drafters.logits.ReducedLogits`:
its own tokens' logits and the shared rest logit); read them with :mod:`onlinespec.drafters.logits`
(``log_softmax_at``, ``argmax``, ``dense``), which take either form."""

from __future__ import annotations

import torch

from onlinespec.learn.batch import FeedbackBatch

__all__ = ["drafter_logits", "feature_logits"]


def _head(model, hidden: torch.Tensor):
    """The head's logits of ``hidden`` [N, H]: unexpanded for a reduced head."""
    compact = getattr(model.lm_head, "compact", None)
    return compact(hidden) if compact is not None else model.lm_head(hidden)


def drafter_logits(model, batch: FeedbackBatch) -> torch.Tensor:
    """[N, V] (or a reduced head's :class:`ReducedLogits`): the drafter's logits predicting each
    generated position from the true prefix."""
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
        return _head(model, out.last_hidden_state[batch.row, batch.col - 1])
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden[batch.row, batch.col]  # [N, H]: only the positions we score go through lm_head
    return _head(model, picked)


def feature_logits(model, batch: FeedbackBatch, levels: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A feature drafter's logits at the batch's positions as if drafting ``L + 1`` deep, per
    level ``L`` (0 .. levels-1; its last ``L`` pairs fed on its own features:
    :func:`~onlinespec.drafters.feature.unrolled_features`), each with the mask of the positions
    that have that much context: ``[([M_L, V] logits, [N] bool)]``. Level 0 is :func:`drafter_logits`'
    (every position has its context). One pass for all levels, and the head only at the scored
    positions: what a learning round of a feature drafter spends most of its time on."""
    from onlinespec.drafters.feature import unrolled_features

    if batch.features is None:
        raise ValueError("a feature drafter learns from its records' captured target features "
                         "(serving.capture_features); this batch has none")
    states = unrolled_features(model, batch.input_ids[:, 1:], batch.features[:, :-1], levels=levels)
    out = []
    for level, g in enumerate(states):
        valid = batch.col - 1 >= level
        out.append((_head(model, g[batch.row[valid], batch.col[valid] - 1]), valid))
    return out
