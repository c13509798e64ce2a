"""A chi-square goodness-of-fit test without scipy (Wilson-Hilferty approximation)."""

from __future__ import annotations

import math

import numpy as np


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """P-value of observing ``counts`` when outcomes follow ``probs``. Bins whose expected
    count is below ``min_expected`` are pooled into one."""
    counts = np.asarray(counts, dtype=float)
    probs = np.asarray(probs, dtype=float)
    n = counts.sum()
    expected = probs / probs.sum() * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if np.any(obs[exp == 0] > 0):
        return 0.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = max(1, obs.size - 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))
