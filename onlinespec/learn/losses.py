"""Per-position losses of a drafter ``q`` against the logged target ``p`` (top-K + a rest bucket).

At generated position ``i``, with ``K + 1`` buckets (the K logged ids and "everything else"):

- ``kl``: forward KL(p || q), the soft cross-entropy minus the (constant) entropy of p;
- ``tv``: ``1 - sum_j min(p_j, q_j)``: one minus the probability that a draft drawn from ``q``
  is accepted against ``p`` (exact with K = V; with K < V the rest bucket makes it a bound);
- accepted-length objectives (arXiv 2606.11552), for autoregressive drafters:
  ``positional`` weights ``decay ** block_index`` inside a draft block;
  ``focal``: ``(1 - alpha)^gamma * kl`` at the first rejected position of each block;
  ``chain``: ``1 - mean_i prod_{j <= i} alpha_j`` inside each block, computed in log space: a
  differentiable surrogate for the expected accepted length.

Losses combine with weights from :class:`LossConfig`. ``tv`` is bounded in [0, 1] and is the
prequential loss the ensembles weigh learners by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from onlinespec.learn.batch import FeedbackBatch

__all__ = ["LossConfig", "LossOutput", "bucket_distributions", "position_terms", "compute_loss"]

EPS = 1e-9


@dataclass(frozen=True)
class LossConfig:
    kl: float = 1.0
    tv: float = 0.0
    chain: float = 0.0
    focal: float = 0.0
    focal_gamma: float = 2.0
    positional_decay: float = 1.0  # 1.0: every block position weighs the same
    positions: str = "all"  # "all" | "drafted" | "rejected" (OSD trains on rejected positions only)

    def __post_init__(self):
        for name in ("kl", "tv", "chain", "focal"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0")
        if self.kl + self.tv + self.chain + self.focal <= 0:
            raise ValueError("at least one loss weight must be positive")
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
    tv: float  # mean over positions: the prequential loss in [0, 1]
    chain: float
    focal: float
    alpha: torch.Tensor  # [N] per-position acceptance probability (detached)
    positions: int


def bucket_distributions(q_logits: torch.Tensor, p_ids: torch.Tensor, p_log: torch.Tensor):
    """(p, q, log p, log q) over K+1 buckets. q_logits: [N, V]; p_ids, p_log: [N, K]."""
    q_log_full = torch.log_softmax(q_logits.float(), dim=-1)
    q_log_k = q_log_full.gather(1, p_ids)  # [N, K]
    p_k = p_log.exp()
    p_rest = (1.0 - p_k.sum(-1, keepdim=True)).clamp_min(0.0)
    q_rest = (1.0 - q_log_k.exp().sum(-1, keepdim=True)).clamp_min(EPS)
    p = torch.cat([p_k, p_rest], dim=-1)
    q = torch.cat([q_log_k.exp(), q_rest], dim=-1)
    return p, q, torch.cat([p_log, p_rest.clamp_min(EPS).log()], -1), torch.cat([q_log_k, q_rest.log()], -1)


def position_terms(q_logits: torch.Tensor, batch: FeedbackBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position forward KL and acceptance probability alpha = sum min(p, q): ([N], [N])."""
    p, q, log_p, log_q = bucket_distributions(q_logits, batch.p_ids, batch.p_log)
    kl = (p * (log_p - log_q)).sum(-1)
    alpha = torch.minimum(p, q).sum(-1).clamp(EPS, 1.0)
    return kl, alpha


def _segment_cumsum(x: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Cumulative sum restarting at each new segment id (positions are in segment order)."""
    cs = x.cumsum(0)
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    start_idx = torch.arange(x.numel(), device=x.device)[starts]
    seg_number = starts.long().cumsum(0) - 1
    before = torch.where(start_idx > 0, cs[(start_idx - 1).clamp_min(0)], torch.zeros_like(start_idx, dtype=cs.dtype))
    return cs - before[seg_number]


def compute_loss(q_logits: torch.Tensor, batch: FeedbackBatch, cfg: LossConfig) -> LossOutput:
    """q_logits: [N, V] drafter logits at the batch's generated positions."""
    kl, alpha = position_terms(q_logits, batch)
    if cfg.positions == "all":
        mask = torch.ones_like(batch.drafted)
    elif cfg.positions == "drafted":
        mask = batch.drafted
    else:
        mask = batch.drafted & ~batch.accepted
    w = mask.float() * cfg.positional_decay ** batch.block_index.float()
    denom = w.sum().clamp_min(1.0)
    total = q_logits.new_zeros(()).float()
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
    return LossOutput(
        total=total,
        kl=float(kl_mean.detach()),
        tv=float((1 - alpha.detach()).mean()),
        chain=float(chain_loss.detach()),
        focal=float(focal_loss.detach()),
        alpha=alpha.detach(),
        positions=int(mask.sum()),
    )
