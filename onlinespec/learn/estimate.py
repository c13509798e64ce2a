"""A drafter's acceptance on recent traffic, known without drafting.

Every feedback record logs the target's distribution at each generated position, so any drafter
can be scored there, teacher-forced, whether it drafted or not (the full-information scoring the
learners and the pool already do): ``alpha`` is the probability that verification would accept
its draft at that position, at the request's temperature. Under the accepted prefix a drafter
sees exactly the true text, so ``alpha`` is the per-token acceptance rate a served block meets,
position by position.

:class:`AcceptanceEstimate` keeps it as decayed sums per group of traffic (``all``, and each
declared domain or API key with enough positions: :func:`group_of`): the learner scores its *served* parameters on each
round's records before learning from them (prequential, never on data they were fit to), so the
figure is an honest one for the version being replaced. Each published version carries it
(``acceptance_estimate`` in its round metrics); the server's draft-length controller starts a
new version from it and refines it with the drafts it serves (:mod:`onlinespec.decode.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["AcceptanceEstimate", "group_of", "overall", "ALL"]

ALL = "all"


def group_of(tenant: str | None, domain: str | None = None) -> str | None:
    """The traffic group of a request: the domain it declared (``metadata.domain``), else its
    API key's tenant (``key:...``) without the ``user`` part, which narrows suffix scoping but
    splits the data too thinly to estimate on."""
    if domain:
        return "domain:" + domain
    if not tenant:
        return None
    return tenant.split("/user:", 1)[0]


def overall(estimate: dict | None) -> float | None:
    """The acceptance on all traffic of an estimate as a version carries it
    (:meth:`AcceptanceEstimate.to_dict`); None where it has none."""
    return (estimate or {}).get(ALL, {}).get("acceptance")


@dataclass
class AcceptanceEstimate:
    decay: float = 0.7  # per round: the estimate follows about the last 3 rounds
    min_positions: float = 64.0  # a group is reported once its decayed positions reach this
    max_groups: int = 64  # the most groups kept (the ones with the least recent data leave first)
    max_position: int = 8  # block positions reported apart (later ones join the last)
    sums: dict[str, list[float]] = field(default_factory=dict)  # group -> [alpha sum, positions]
    by_position: list[list[float]] = field(default_factory=list)  # block index -> [alpha sum, positions]

    def update(self, alpha: torch.Tensor, groups: list[str | None], block_index: torch.Tensor | None = None) -> None:
        """``alpha`` [N]: the served drafter's acceptance at a round's positions, before it learned
        from them; ``groups`` [N]: each position's traffic group (None: only ``all``)."""
        alpha = alpha.detach().float().cpu()
        for key in self.sums:
            self.sums[key] = [v * self.decay for v in self.sums[key]]
        self._add(ALL, float(alpha.sum()), alpha.numel())
        per: dict[str, list[float]] = {}
        for a, g in zip(alpha.tolist(), groups):
            if g is not None:
                s = per.setdefault(g, [0.0, 0.0])
                s[0] += a
                s[1] += 1
        for g, (s, n) in per.items():
            self._add(g, s, n)
        if len(self.sums) > self.max_groups + 1:
            keep = sorted((k for k in self.sums if k != ALL), key=lambda k: -self.sums[k][1])[: self.max_groups]
            self.sums = {k: self.sums[k] for k in [ALL, *keep]}
        if block_index is not None:
            self.by_position = [[v * self.decay for v in s] for s in self.by_position]
            idx = block_index.detach().cpu().clamp_max(self.max_position - 1)
            for i in range(int(idx.max()) + 1 if idx.numel() else 0):
                at = idx == i
                while len(self.by_position) <= i:
                    self.by_position.append([0.0, 0.0])
                self.by_position[i][0] += float(alpha[at].sum())
                self.by_position[i][1] += float(at.sum())

    def _add(self, key: str, alpha_sum: float, n: float) -> None:
        s = self.sums.setdefault(key, [0.0, 0.0])
        s[0] += alpha_sum
        s[1] += n

    def acceptance(self, group: str | None = None) -> float | None:
        """The estimate for a group (None, or a group with too little data: the whole target's)."""
        s = self.sums.get(group) if group is not None else None
        if s is None or s[1] < self.min_positions:
            s = self.sums.get(ALL)
        return s[0] / s[1] if s and s[1] > 0 else None

    def to_dict(self) -> dict:
        """What a version carries: ``{"all": {"acceptance", "positions"}, group: {...}, "by_position": [...]}``
        (groups with enough data only; positions are decayed counts)."""
        out = {k: {"acceptance": s[0] / s[1], "positions": round(s[1], 1)}
               for k, s in self.sums.items() if s[1] > 0 and (k == ALL or s[1] >= self.min_positions)}
        out["by_position"] = [round(s[0] / s[1], 4) if s[1] else None for s in self.by_position]
        return out

    def state(self) -> dict:
        return {"sums": self.sums, "by_position": self.by_position}

    def load_state(self, state: dict) -> None:
        self.sums = {k: [float(a), float(n)] for k, (a, n) in state.get("sums", {}).items()}
        self.by_position = [[float(a), float(n)] for a, n in state.get("by_position", [])]
