"""Per-position losses of a drafter ``q`` against the logged target ``p`` (top-K + a rest bucket).

At generated position ``i``, with ``K + 1`` buckets (the K logged ids and "everything else"):

- ``kl``: forward KL(p_T || q), the soft cross-entropy minus the (constant) entropy of p_T.
  ``p_T`` is the target at the request's temperature ``T`` (floored at ``temperature_floor``;
  ``T >= 1`` and the default floor 1.0 use the logged ``p`` as is): verification accepts
  against the distribution the request samples from, and a greedy request accepts only the
  target's argmax. ``log p_T = log p / T`` renormalized is exact on the K logged ids; the rest
  bucket gets its upper bound ``p_rest * p_min^(1/T - 1)`` (no rest token is likelier than the
  least likely logged one);
- ``tv``: ``1 - sum_j min(p_j, q_j)`` on the logged ``p`` (whatever the floor): one minus the
  probability that a draft drawn from ``q`` is accepted against ``p`` (exact with K = V; with
  K < V the rest bucket makes it a bound);
- accepted-length objectives (arXiv 2606.11552), for autoregressive drafters:
  ``positional`` weights ``decay ** block_index`` inside a draft block;
  ``focal``: ``(1 - alpha)^gamma * kl`` at the first rejected position of each block;
  ``chain``: ``1 - mean_i prod_{j <= i} alpha_j`` inside each block, computed in log space: a
  differentiable surrogate for the expected accepted length.

Losses combine with weights from :class:`LossConfig`; the ``tv``, ``chain`` and ``focal`` terms
use the acceptance probability at temperature 1 (smooth, so it trains whatever the request).

The prequential loss that regret is measured on and that Hedge weighs learners and drafters by
is ``1 - acceptance``, the acceptance under each request's own temperature
(:func:`acceptance`): for a greedy request, whether the drafter's argmax is the target's. It is
bounded in [0, 1] and is what serving actually experienced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from onlinespec.drafters.logits import argmax, log_softmax_at
from onlinespec.learn.batch import FeedbackBatch

__all__ = ["LossConfig", "LossOutput", "bucket_distributions", "sharpened_log_p", "position_terms",
           "acceptance", "compute_loss"]

EPS = 1e-9


@dataclass(frozen=True)
class LossConfig:
    kl: float = 1.0
    tv: float = 0.0
    chain: float = 0.0
    focal: float = 0.0
    focal_gamma: float = 2.0
    positional_decay: float = 1.0  # 1.0: every block position weighs the same
    temperature_floor: float = 1.0  # KL toward p at max(request temperature, floor); 1.0: the logged p
    positions: str = "all"  # "all" | "drafted" | "rejected" (OSD trains on rejected positions only)

    def __post_init__(self):
        for name in ("kl", "tv", "chain", "focal"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0")
        if self.kl + self.tv + self.chain + self.focal <= 0:
            raise ValueError("at least one loss weight must be positive")
        if not 0 < self.temperature_floor <= 1:
            raise ValueError("temperature_floor must be in (0, 1]")
        if not 0 < self.positional_decay <= 1:
            raise ValueError("positional_decay must be in (0, 1]")
        if self.positions not in ("all", "drafted", "rejected"):
            raise ValueError(f"positions must be all, drafted or rejected, got {self.positions!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LossOutput:
    total: torch.Tensor  # scalar to differentiate
    kl: float
    prequential: float  # mean over positions of 1 - acceptance(): the loss regret is measured on
    chain: float
    focal: float
    alpha: torch.Tensor  # [N] per-position acceptance at the request's temperature (detached)
    positions: int


def bucket_distributions(q_logits, p_ids: torch.Tensor, p_log: torch.Tensor,
                         temperature: torch.Tensor | None = None):
    """(p, q, log p, log q) over K+1 buckets. q_logits: [N, V] or a reduced head's
    (:mod:`onlinespec.drafters.logits`); p_ids, p_log: [N, K]; ``temperature`` [N]: q at it."""
    q_log_k = log_softmax_at(q_logits, p_ids, temperature)  # [N, K]
    p_k = p_log.exp()
    p_rest = (1.0 - p_k.sum(-1, keepdim=True)).clamp_min(0.0)
    q_rest = (1.0 - q_log_k.exp().sum(-1, keepdim=True)).clamp_min(EPS)
    p = torch.cat([p_k, p_rest], dim=-1)
    q = torch.cat([q_log_k.exp(), q_rest], dim=-1)
    return p, q, torch.cat([p_log, p_rest.clamp_min(EPS).log()], -1), torch.cat([q_log_k, q_rest.log()], -1)


def sharpened_log_p(p_log: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log p_T over the K+1 buckets from the logged top-K log-probs (temperature 1). p_log: [N, K];
    temperature: [N], each in (0, 1]. At T = 1 this is the logged distribution with its rest bucket."""
    t = temperature.unsqueeze(-1)
    p_rest = (1.0 - p_log.exp().sum(-1, keepdim=True)).clamp_min(EPS)
    log_p_min = p_log.min(-1, keepdim=True).values
    # unnormalized: p_j^(1/T) for the logged ids; sum over the rest of p_r^(1/T) <= p_rest * p_min^(1/T - 1)
    rest = p_rest.log() + (1.0 / t - 1.0) * log_p_min
    return torch.log_softmax(torch.cat([p_log / t, rest], -1), -1)


def position_terms(q_logits, batch: FeedbackBatch,
                   temperature_floor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position forward KL(p_T || q) and acceptance probability alpha = sum min(p, q) on the
    logged p: ([N], [N]). ``temperature_floor`` < 1: the KL's p is at each request's temperature."""
    p, q, log_p, log_q = bucket_distributions(q_logits, batch.p_ids, batch.p_log)
    if temperature_floor < 1.0:
        log_p_t = sharpened_log_p(batch.p_log, batch.temperature.clamp(temperature_floor, 1.0))
        kl = (log_p_t.exp() * (log_p_t - log_q)).sum(-1)
    else:
        kl = (p * (log_p - log_q)).sum(-1)
    alpha = torch.minimum(p, q).sum(-1).clamp(EPS, 1.0)
    return kl, alpha


@torch.no_grad()
def acceptance(q_logits, batch: FeedbackBatch) -> torch.Tensor:
    """[N] probability that verification accepts the drafter's token at each position, with the
    target and drafter both at the request's temperature: 1 or 0 for greedy requests (the
    drafter's argmax is the target's logged top-1, or not); ``sum min(p_T, q_T)`` otherwise, with
    ``q_T`` exact, ``p_T`` from the logged top-K (:func:`sharpened_log_p`) and ``T`` capped at 1.
    Top-k and top-p cuts are not modelled."""
    greedy = batch.temperature <= 0
    out = (argmax(q_logits) == batch.p_ids[:, 0]).float()
    if not greedy.all():
        t = batch.temperature.clamp(1e-3, 1.0)
        p = sharpened_log_p(batch.p_log, t).exp()
        _, q, _, _ = bucket_distributions(q_logits, batch.p_ids, batch.p_log, t)
        sampled = torch.minimum(p, q).sum(-1).clamp(0.0, 1.0)
        out = torch.where(greedy, out, sampled)
    return out


def _segment_cumsum(x: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Cumulative sum restarting at each new segment id (positions are in segment order)."""
    cs = x.cumsum(0)
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    start_idx = torch.arange(x.numel(), device=x.device)[starts]
    seg_number = starts.long().cumsum(0) - 1
    before = torch.where(start_idx > 0, cs[(start_idx - 1).clamp_min(0)], torch.zeros_like(start_idx, dtype=cs.dtype))
    return cs - before[seg_number]


def compute_loss(q_logits, batch: FeedbackBatch, cfg: LossConfig) -> LossOutput:
    """q_logits: [N, V] drafter logits at the batch's generated positions, or a reduced head's
    (:mod:`onlinespec.drafters.logits`)."""
    kl, alpha = position_terms(q_logits, batch, cfg.temperature_floor)
    if cfg.positions == "all":
        mask = torch.ones_like(batch.drafted)
    elif cfg.positions == "drafted":
        mask = batch.drafted
    else:
        mask = batch.drafted & ~batch.accepted
    w = mask.float() * cfg.positional_decay ** batch.block_index.float()
    denom = w.sum().clamp_min(1.0)
    total = kl.new_zeros(())
    kl_mean = (w * kl).sum() / denom
    tv_mean = (w * (1 - alpha)).sum() / denom
    total = total + cfg.kl * kl_mean + cfg.tv * tv_mean
    chain_loss = torch.zeros(())
    if cfg.chain > 0:
        chain = _segment_cumsum(alpha.log(), batch.block).exp()  # prod_{j<=i} alpha_j within the block
        chain_loss = 1.0 - chain.mean()
        total = total + cfg.chain * chain_loss
    focal_loss = torch.zeros(())
    rejected = batch.drafted & ~batch.accepted
    if cfg.focal > 0 and rejected.any():
        focal_loss = ((1 - alpha[rejected]) ** cfg.focal_gamma * kl[rejected]).mean()
        total = total + cfg.focal * focal_loss
    served = acceptance(q_logits.detach(), batch)
    return LossOutput(
        total=total,
        kl=float(kl_mean.detach()),
        prequential=float((1 - served).mean()),
        chain=float(chain_loss.detach()),
        focal=float(focal_loss.detach()),
        alpha=served,
        positions=int(mask.sum()),
    )
