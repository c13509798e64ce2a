"""Verification: given the target's distributions over a drafted block, decide what is accepted.

One function for both modes. With greedy settings ``p`` is one-hot on the target's argmax and
the rule below reduces to "accept while the draft equals the argmax, then emit the argmax".
With sampling it is the rejection sampler of Leviathan et al. / Chen et al.: accept draft ``d``
with probability ``min(1, p(d) / q(d))``; at the first rejection draw from the residual
``norm(max(0, p - q))``; if every draft is accepted draw a bonus token from the next ``p``.
The output is then distributed exactly as sampling from ``p`` token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onlinespec.decode.sampling import SamplingParams, noisy_argmax, probs

__all__ = ["Verdict", "verify", "verify_coupled"]


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of leading drafts accepted, 0..m
    token: int  # the target's own token after them: correction (accepted < m) or bonus (== m)


def verify(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Verdict:
    """logits: [m+1, V] target logits at the m drafted positions and the one after them.
    drafts: [m]; q: [m, V] drafter distributions, or None for one-hot (deterministic drafts).
    """
    m = drafts.numel()
    if params.greedy:
        # Compare argmaxes directly: no distributions needed.
        best = logits.argmax(-1)  # [m+1]
        matches = (best[:m] == drafts).long()
        accepted = int(matches.cumprod(0).sum()) if m else 0
        return Verdict(accepted, int(best[accepted]))

    p = probs(logits, params)  # [m+1, V]
    if m:
        idx = torch.arange(m)
        p_d = p[idx, drafts]  # [m]
        q_d = q[idx, drafts] if q is not None else torch.ones(m)
        u = torch.rand(m, generator=generator)
        # accept iff u < p(d)/q(d), written without dividing by q(d)
        ok = (u * q_d < p_d).long()
        accepted = int(ok.cumprod(0).sum())
    else:
        accepted = 0
    if accepted < m:
        q_row = q[accepted] if q is not None else torch.zeros_like(p[accepted]).index_fill_(0, drafts[accepted : accepted + 1], 1.0)
        residual = (p[accepted] - q_row).clamp_min_(0.0)
        total = residual.sum()
        # p == q at this position means the draft could not have been rejected; guard rounding.
        dist = residual / total if total > 0 else p[accepted]
    else:
        dist = p[m]
    token = int(torch.multinomial(dist, 1, generator=generator))
    return Verdict(accepted, token)


def verify_coupled(logits: torch.Tensor, drafts: torch.Tensor, params: SamplingParams,
                   noise: torch.Tensor) -> Verdict:
    """A seeded request's verification (:class:`~onlinespec.decode.sampling.PositionNoise`): the target's
    token at each position is ``argmax(log p + g)`` with that position's noise ``g`` ([m+1, V]),
    an exact sample from ``p`` fixed by the seed and the position; drafts are accepted while they
    equal it (the greedy rule on perturbed log-probabilities), then that token is emitted."""
    m = drafts.numel()
    best = noisy_argmax(logits, params, noise)  # [m+1]
    matches = (best[:m].cpu() == drafts).long()
    accepted = int(matches.cumprod(0).sum()) if m else 0
    return Verdict(accepted, int(best[accepted]))
