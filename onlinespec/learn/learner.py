"""One drafter learning online: prequential rounds over feedback batches.

A round, in this order (the order is what makes the accounting honest):

1. evaluate the *served* parameters on the new batch: the loss the live drafter actually
   suffered, on which regret is measured;
2. update the ensemble weights from each base learner's loss on that batch, all measured
   before any of them updates;
3. take each base learner's gradient step.

With ``ensemble_size > 1`` the base learners are copies of the drafter whose step sizes lie on
a geometric grid around ``optim.lr``; Hedge weighs them and the served drafter is their
weight-averaged parameters (one model, no extra serving cost).
"""

from __future__ import annotations

import copy
import math
import re
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from onlinespec.feedback.record import FeedbackRecord
from onlinespec.learn.batch import FeedbackBatch, collate
from onlinespec.learn.estimate import AcceptanceEstimate, group_of
from onlinespec.learn.forward import drafter_logits, feature_logits
from onlinespec.learn.hedge import Hedge
from onlinespec.learn.losses import LossConfig, compute_loss
from onlinespec.learn.optim import OnlineOptimizer, OptimConfig

__all__ = ["LearnerConfig", "RoundMetrics", "DrafterLearner", "records_to_learn", "drafter_learner_configs"]


@dataclass(frozen=True)
class LearnerConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ensemble_size: int = 1
    grid_factor: float = 3.0  # step sizes lr * factor^j, j centred on 0
    hedge_eta: float = 4.0
    optimistic_hedge: bool = True
    hedge_discount: float = 1.0  # < 1: past losses fade, Hedge tracks the recent best (drifting traffic)
    trainable: str = ".*"  # regex on parameter names; the rest stays frozen
    regret_window: int = 20  # rounds in the sliding-window (dynamic) comparator
    max_len: int = 1024
    steps_per_round: int = 1  # gradient steps on each round's batch (the first at the played point)
    learn_from: str = "all"  # all: every record of the target | served: only those this drafter served
    # a feature drafter learns as if drafting this many positions deep, each past the first fed on
    # its own features (the training-time test); the loss is the mean over the depths, position
    # j's weighted by feature_depth_decay**j (EAGLE-3 trains with 0.8**j)
    feature_depth: int = 2
    feature_depth_decay: float = 1.0

    def __post_init__(self):
        if self.steps_per_round < 1:
            raise ValueError("steps_per_round must be >= 1")
        if self.feature_depth < 1:
            raise ValueError("feature_depth must be >= 1")
        if not 0 < self.feature_depth_decay <= 1:
            raise ValueError("feature_depth_decay must be in (0, 1]")
        if self.learn_from not in ("all", "served"):
            raise ValueError(f"learn_from must be all or served, got {self.learn_from!r}")
        if self.ensemble_size < 1:
            raise ValueError("ensemble_size must be >= 1")
        if self.grid_factor <= 1:
            raise ValueError("grid_factor must be > 1")
        if not 0 < self.hedge_discount <= 1:
            raise ValueError("hedge_discount must be in (0, 1]")
        if self.regret_window < 1:
            raise ValueError("regret_window must be >= 1")
        re.compile(self.trainable)

    def step_sizes(self) -> list[float]:
        n = self.ensemble_size
        return [self.optim.lr * self.grid_factor ** (j - (n - 1) / 2) for j in range(n)]

    def to_dict(self) -> dict:
        return asdict(self)

    def merged(self, overrides: dict) -> LearnerConfig:
        """These settings with ``overrides`` over them; the ``loss`` and ``optim`` sections merged
        key by key. A misspelt or out-of-range setting is a ValueError."""
        if not isinstance(overrides, dict):
            raise ValueError(f"a mapping of learner settings, got {overrides!r}")
        out = self.to_dict()
        for key, value in overrides.items():
            out[key] = {**out[key], **value} if key in ("loss", "optim") and isinstance(value, dict) else value
        return LearnerConfig.from_dict(out)

    @classmethod
    def from_yaml(cls, path) -> LearnerConfig:
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    @classmethod
    def from_dict(cls, d: dict) -> LearnerConfig:
        d = dict(d)
        loss = LossConfig(**d.pop("loss", {}))
        optim = OptimConfig(**d.pop("optim", {}))
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown learner settings: {sorted(unknown)}")
        return cls(loss=loss, optim=optim, **d)


def drafter_learner_configs(cfg, learner_file: str | None = None) -> dict[str, LearnerConfig]:
    """Every drafter's learner settings on a first start, by drafter id: the learner YAML
    (``learner_file``, else the service config's ``learner``, else the defaults) with the drafter's
    own ``learner:`` mapping (:class:`onlinespec.config.DrafterSpec`) over it. A misspelt or
    out-of-range setting is a ValueError that names the drafter, before any round runs."""
    path = learner_file or cfg.learner
    base = LearnerConfig.from_yaml(path) if path else LearnerConfig()
    out = {}
    for spec in cfg.drafters:
        try:
            out[spec.id] = base.merged(spec.learner) if spec.learner else base
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cfg.source}: drafters[{spec.id}].learner: {exc}") from None
    return out


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    records: int
    positions: int
    served_loss: float  # served drafter before the update: 1 - acceptance at each request's temperature
    served_kl: float
    base_losses: list[float]
    weights: list[float]
    step_sizes: list[float]
    param_change_norm: float  # || served(new) - served(parent) ||
    cumulative_loss: float
    regret_vs_best_fixed: float  # cumulative served loss - best base learner's, over all rounds
    dynamic_regret: float  # the same over the last ``regret_window`` rounds
    mean_alpha: float  # mean acceptance of the served drafter on the batch (losses.acceptance)
    # a feature drafter's acceptance at a block's second position, where it drafts on its own
    # feature, given the first was accepted (teacher-forced; None for other drafters): how far
    # the first-position figure above holds deeper in its blocks
    mean_alpha_deeper: float | None = None
    # the served drafter's acceptance on recent rounds, before it learned from them, overall and per
    # traffic group (learn/estimate.py): what the server's controller starts the new version from
    acceptance_estimate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def records_to_learn(records: list[FeedbackRecord], drafter: str, config: LearnerConfig) -> list[FeedbackRecord]:
    """The records a drafter learns from. ``served`` keeps each drafter of a pool a specialist:
    it learns the traffic it wins and keeps what it knew of the rest (no forgetting by proxy)."""
    if config.learn_from == "served":
        return [r for r in records if r.drafter_id == drafter]
    return list(records)


_POSITIONAL = ("row", "col", "p_ids", "p_log", "drafted", "accepted", "block_index", "block", "temperature")


def _mean(out) -> float | None:
    """The mean acceptance of a loss output (None: none was computed)."""
    return float(out.alpha.detach().mean()) if out is not None else None


def _trainable_names(model, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [n for n, _ in model.named_parameters() if rx.search(n)]


class DrafterLearner:
    def __init__(self, model, config: LearnerConfig = LearnerConfig()):
        self.config = config
        self.model = model.float().train(False)
        self.names = _trainable_names(model, config.trainable)
        if not self.names:
            raise ValueError(f"no parameter matches trainable={config.trainable!r}")
        params = dict(model.named_parameters())
        start = {n: params[n].detach() for n in self.names}
        self.optimizers = [
            OnlineOptimizer(start, replace(config.optim, lr=lr)) for lr in config.step_sizes()
        ]
        self.hedge = Hedge(config.ensemble_size, config.hedge_eta, config.optimistic_hedge, config.hedge_discount)
        self.work = copy.deepcopy(model).float()  # evaluated and differentiated in place
        for n, p in self.work.named_parameters():
            p.requires_grad_(n in self.names)
        self.rounds = 0
        self.cumulative = 0.0
        self.base_cumulative = np.zeros(config.ensemble_size)
        self.window: deque = deque(maxlen=config.regret_window)  # (served, base losses) per round
        self.estimate = AcceptanceEstimate()
        self.record_losses: tuple[np.ndarray, np.ndarray] | None = None  # of the last round (see round())

    # ------------------------------------------------------------------ serving side

    def served_params(self) -> dict[str, torch.Tensor]:
        """Trainable parameters of the served drafter: the Hedge-weighted average of the plays."""
        w = self.hedge.weights
        plays = [opt.play() for opt in self.optimizers]
        return {n: sum(float(w[i]) * plays[i][n] for i in range(len(plays))) for n in self.names}

    def served_model(self):
        """A copy of the drafter carrying the served parameters."""
        model = copy.deepcopy(self.model)
        self._load(model, self.served_params())
        return model.eval()

    @staticmethod
    def _load(model, params: dict[str, torch.Tensor]) -> None:
        own = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in params.items():
                own[n].copy_(v)

    # ------------------------------------------------------------------ learning side

    def _loss(self, params, batch: FeedbackBatch, grad: bool):
        """(the loss at the first drafted position, its gradients with ``grad``, and for a feature
        drafter the loss at the second position: :class:`LossOutput` or None). Without ``grad``
        the total covers at most the first two positions (only the metrics read it then)."""
        self._load(self.work, params)
        deeper = None
        with torch.set_grad_enabled(grad):
            if batch.features is None:
                out = compute_loss(drafter_logits(self.work, batch), batch, self.config.loss)
            else:
                # a feature drafter drafts past the first position on its own features: it learns
                # there too (the training-time test), the loss averaged over the depths
                # without gradients only the first two positions are read (the metrics): no deeper
                depth = self.config.feature_depth if grad else min(2, self.config.feature_depth)
                (first, _), *rest = feature_logits(self.work, batch, levels=depth)
                out = compute_loss(first, batch, self.config.loss)
                decay = self.config.feature_depth_decay
                total, weights = out.total, 1.0
                for j, (q, valid) in enumerate(rest, start=1):
                    if not bool(valid.any()):
                        continue
                    sub = replace(batch, **{f: getattr(batch, f)[valid] for f in _POSITIONAL})
                    level = compute_loss(q, sub, self.config.loss)
                    if deeper is None:  # the second position's: mean_alpha_deeper
                        deeper = level
                    total, weights = total + decay ** j * level.total, weights + decay ** j
                out = replace(out, total=total / weights)
        grads = None
        if grad:
            named = dict(self.work.named_parameters())
            gs = torch.autograd.grad(out.total, [named[n] for n in self.names], allow_unused=True)
            grads = {n: (g if g is not None else torch.zeros_like(named[n])) for n, g in zip(self.names, gs)}
        return out, grads, deeper

    def evaluate(self, records: list[FeedbackRecord], features: list | None = None) -> dict:
        """Loss of the served drafter on records, without learning from them (``features``: each
        record's captured target features, for a feature drafter)."""
        batch = collate(records, self.config.max_len, features=features)
        with torch.no_grad():
            out, _, deeper = self._loss(self.served_params(), batch, grad=False)
        return {"prequential_loss": out.prequential, "kl": out.kl, "mean_alpha": float(out.alpha.mean()),
                "mean_alpha_deeper": _mean(deeper), "positions": batch.positions}

    def round(self, records: list[FeedbackRecord], features: list | None = None) -> RoundMetrics:
        batch = collate(records, self.config.max_len, features=features)
        parent = self.served_params()
        # 1.-2. every base learner's loss (and gradient) at its played point, before any update, and
        # the prequential loss of what was served: with one learner that is its played point
        # (weight 1), whose loss was just measured; an ensemble serves the weighted average
        outs, grads, deepers = zip(*(self._loss(opt.play(), batch, grad=True) for opt in self.optimizers))
        if len(self.optimizers) == 1:
            served, served_deeper = outs[0], deepers[0]
        else:
            with torch.no_grad():
                served, _, served_deeper = self._loss(parent, batch, grad=False)
        base = np.array([o.prequential for o in outs])
        # each record's share of the served loss (sum of 1 - acceptance over its positions, and
        # how many): replay scoring pairs configurations record by record (onlinespec.learn.tune)
        lost = (1 - served.alpha).detach().double().numpy()
        rows = batch.row.numpy()
        self.record_losses = (np.bincount(rows, lost, len(records)), np.bincount(rows, minlength=len(records)))
        groups = [group_of(r.tenant, r.domain) for r in records]
        self.estimate.update(served.alpha, [groups[i] for i in batch.row.tolist()], batch.block_index)
        self.hedge.update(base)
        # 3. gradient steps (further ones re-evaluate the same batch at the moved point)
        for opt, g in zip(self.optimizers, grads):
            opt.step(g)
            for _ in range(self.config.steps_per_round - 1):
                opt.step(self._loss(opt.play(), batch, grad=True)[1])
        new = self.served_params()
        change = math.sqrt(sum(float(((new[n] - parent[n]) ** 2).sum()) for n in self.names))

        self.rounds += 1
        self.cumulative += served.prequential
        self.base_cumulative += base
        self.window.append((served.prequential, base))
        win_served = sum(s for s, _ in self.window)
        win_base = np.sum([b for _, b in self.window], axis=0)
        return RoundMetrics(
            round=self.rounds,
            records=batch.records,
            positions=batch.positions,
            served_loss=served.prequential,
            served_kl=served.kl,
            base_losses=base.tolist(),
            weights=self.hedge.weights.tolist(),
            step_sizes=[opt.config.lr for opt in self.optimizers],
            param_change_norm=change,
            cumulative_loss=self.cumulative,
            regret_vs_best_fixed=self.cumulative - float(self.base_cumulative.min()),
            dynamic_regret=win_served - float(win_base.min()),
            mean_alpha=float(served.alpha.mean()),
            mean_alpha_deeper=_mean(served_deeper),
            acceptance_estimate=self.estimate.to_dict(),
        )

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, json-able numbers): everything needed to continue from this point."""
        tensors = {}
        for i, opt in enumerate(self.optimizers):
            tensors.update({f"opt{i}/{k}": v.contiguous() for k, v in opt.state_tensors().items()})
        meta = {
            "config": self.config.to_dict(),
            "rounds": self.rounds,
            "optimizer_rounds": [opt.rounds for opt in self.optimizers],
            "hedge": self.hedge.state(),
            "cumulative": self.cumulative,
            "base_cumulative": self.base_cumulative.tolist(),
            "window": [[s, list(map(float, b))] for s, b in self.window],
            "estimate": self.estimate.state(),
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if len(meta["optimizer_rounds"]) != len(self.optimizers):
            raise ValueError("saved state has a different ensemble size")
        for i, opt in enumerate(self.optimizers):
            prefix = f"opt{i}/"
            opt.load_state_tensors(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["optimizer_rounds"][i]
            )
        self.hedge = Hedge.from_state(meta["hedge"])
        self.rounds = int(meta["rounds"])
        self.cumulative = float(meta["cumulative"])
        self.base_cumulative = np.asarray(meta["base_cumulative"], dtype=float)
        self.window = deque(((s, np.asarray(b)) for s, b in meta["window"]), maxlen=self.config.regret_window)
        self.estimate.load_state(meta.get("estimate", {}))
