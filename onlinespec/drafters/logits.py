"""A drafter's logits as the learners read them: dense ``[N, V]`` or a reduced head's, unexpanded.

A reduced head (:class:`~onlinespec.drafters.cut.ReducedHead`) gives ``V_r`` tokens their own
logit and every other token one shared logit, ``rest``. Its full-vocabulary logits are that,
scattered into ``V`` columns: for SmolLM2 (``V`` = 49152, ``V_r`` = 8192) a learning round spent
half its time building them and taking their softmax and its gradient. :class:`ReducedLogits`
keeps the ``V_r`` columns and the rest logit; the learners need only the log-probabilities of
the target's logged top-K ids and the argmax, and both are exact from that:
``log Z = logsumexp(small, rest + log(V - V_r))``.

Every function here takes either form, so a drafter with a dense head reads the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ReducedLogits", "log_softmax_at", "argmax", "dense"]


@dataclass(frozen=True)
class ReducedLogits:
    small: torch.Tensor  # [N, V_r] ([..., V_r] for dense()): the head's own tokens' logits, in its order
    rest: torch.Tensor  # []: every other token's logit
    ids: torch.Tensor  # [V_r] int64: the vocabulary id of each column of ``small``
    column: torch.Tensor  # [V] int64: each vocabulary id's column in ``small``, V_r for a rest token
    first_rest: int  # the lowest vocabulary id outside the head (the full argmax's pick on a tie)

    @property
    def vocab(self) -> int:
        return len(self.column)

    def detach(self) -> ReducedLogits:
        return ReducedLogits(self.small.detach(), self.rest.detach(), self.ids, self.column, self.first_rest)

    def dense(self) -> torch.Tensor:
        """[..., V]: the full-vocabulary logits (what the head's forward returns)."""
        lead = self.small.shape[:-1]
        full = self.rest.to(self.small.dtype).expand(*lead, self.vocab)
        return full.scatter(-1, self.ids.expand(*lead, len(self.ids)), self.small)


def log_softmax_at(logits, ids: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K]: ``log_softmax(logits / T)`` at ``ids`` ([N, K] vocabulary ids), in float32.
    ``temperature``: [N] per row, or None for 1."""
    if not isinstance(logits, ReducedLogits):
        x = logits.float()
        if temperature is not None:
            x = x / temperature.unsqueeze(-1)
        return torch.log_softmax(x, dim=-1).gather(1, ids)
    small = logits.small.float()
    rest = logits.rest.float().expand(small.shape[0])
    if temperature is not None:
        small = small / temperature.unsqueeze(-1)
        rest = rest / temperature
    cols = torch.cat([small, rest.unsqueeze(-1)], dim=-1)  # [N, V_r + 1]: the last is any rest token's
    n_rest = logits.vocab - small.shape[1]
    if n_rest > 0:
        log_z = torch.logsumexp(torch.cat([small, (rest + math.log(n_rest)).unsqueeze(-1)], -1), -1)
    else:
        log_z = torch.logsumexp(small, -1)
    return cols.gather(1, logits.column[ids]) - log_z.unsqueeze(-1)


def argmax(logits) -> torch.Tensor:
    """[N]: each row's argmax vocabulary id, ties to the lowest id (as ``dense(logits).argmax(-1)``)."""
    if not isinstance(logits, ReducedLogits):
        return logits.argmax(-1)
    small = logits.small.detach()
    top = small.max(-1).values
    best = torch.where(small == top.unsqueeze(-1), logits.ids, logits.vocab).min(-1).values
    if logits.first_rest >= logits.vocab:  # the head covers the whole vocabulary
        return best
    rest = logits.rest.detach().to(small.dtype)
    pick_rest = (rest > top) | ((rest == top) & (logits.first_rest < best))
    return torch.where(pick_rest, torch.full_like(best, logits.first_rest), best)


def dense(logits) -> torch.Tensor:
    """[N, V] full-vocabulary logits, whichever form ``logits`` is in."""
    return logits.dense() if isinstance(logits, ReducedLogits) else logits
