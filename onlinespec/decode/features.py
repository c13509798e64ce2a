"""The target's features of one request: its last hidden state at every position it has read.

Verification computes them anyway (the head turns each into ``p``); a request whose drafter is a
:class:`~onlinespec.drafters.feature.FeatureDrafter` keeps them, because its drafter reads the
target's feature of each settled token. Positions ``0 .. len(tokens) - 2`` are known (the last
settled token is read with the next drafts).
"""

from __future__ import annotations

import torch

__all__ = ["FeatureLog"]


class FeatureLog:
    """Features ``[n, H]`` in a buffer grown by doubling; :meth:`cut` forgets a tail."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, rows: torch.Tensor) -> None:
        """Add ``rows`` ``[m, H]`` after what is kept."""
        m = rows.shape[0]
        if not m:
            return
        if self.buffer is None:
            self.buffer = rows.new_empty(max(64, 2 * m), rows.shape[1])
        elif self.length + m > self.buffer.shape[0]:
            grown = self.buffer.new_empty(max(2 * self.buffer.shape[0], self.length + m), self.buffer.shape[1])
            grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        self.buffer[self.length: self.length + m] = rows
        self.length += m

    def cut(self, length: int) -> None:
        self.length = min(self.length, max(0, length))

    def __getitem__(self, index: slice) -> torch.Tensor:
        assert isinstance(index, slice), "FeatureLog is read by slices"
        start, stop, _ = index.indices(self.length)
        return self.buffer[start:stop] if self.buffer is not None else torch.empty(0, 0)
