"""Linear layers over a few rows, computed the way this CPU computes them fast.

A decode or verify step multiplies a few rows of activations (``x [M, K]``: one position per
row of a batch, or a row's k + 1 verified positions) by every weight of the model, each read
from memory once. For a small M, MKL's GEMM (``F.linear``: ``x @ W.T``) runs far below the
speed of the matrix-vector product it does at M = 1, while the same product computed as
``(W @ x.T).T`` does not. Measured on this project's 2-core AMD EPYC (AVX2, torch 2.13,
MKL 2024.2), weights streamed from memory as in a forward:

- SmolLM2-135M's 210 body linears, one pass: 33-35 ms at M = 1; ``F.linear`` 55 / 74 / 67 / 55 /
  52 / 51 / 66 / 76 / 83 / 107 ms at M = 2 / 3 / 4 / 5 / 6 / 8 / 12 / 16 / 24 / 32, ``(W @ x.T).T``
  34 / 48 / 39 / 50 / 63 / 65 / 75 / 60 / 74 / 80 ms;
- its head (49152 x 576): 10 ms at M = 1; ``F.linear`` 25 / 23 / 25 / 26 / 31 ms at
  M = 2 / 4 / 6 / 8 / 16, ``(W @ x.T).T`` 9 / 11 / 14 / 16 / 21 ms; a reduced 8192-token drafter
  head 3.6 / 4.2 / 4.4 ms vs 1.5 / 1.5 / 3.2 ms at M = 2 / 4 / 16.

So a verify step of k + 1 positions cost SmolLM2 1.6-2x a plain step already at k = 1 (one
forward at one row: 56 ms for one position, 114 / 143 / 148 ms for 2 / 3 / 5; with
:func:`project` 61 / 96 / 108 ms). At M = 1 both are the same matrix-vector product; from 6 to
12 rows ``F.linear`` was faster for the body's weights, and for a prefill's hundreds of rows it
is as fast or faster: :func:`project` takes the transposed product only where it measured
faster. ``python -m onlinespec.cpu_linear`` prints the comparison on the machine at hand (the
figures move by 10-20% between runs on a shared machine; the gaps above do not).

The result is the same product summed in another order: within float rounding, as a batched
forward is from a one-row forward (the lossless tests cover both). GPUs and gradients take the
plain path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["project", "SmallBatchLinear", "use_small_batch_linears", "plain_linears", "FEW_ROWS", "MANY_ROWS",
           "WIDE"]

FEW_ROWS = 5  # rows up to which the transposed product pays for any weight
MANY_ROWS = (16, 48)  # and again from 16 to 48 rows (from 6 to 12 F.linear was faster here)
WIDE = 8192  # output columns (a head) from which it pays at every row count from 2 to 48
_plain = 0  # inside plain_linears(): F.linear everywhere


def _transposed(rows: int, columns: int) -> bool:
    if columns >= WIDE:
        return 2 <= rows <= MANY_ROWS[1]
    return 2 <= rows <= FEW_ROWS or MANY_ROWS[0] <= rows <= MANY_ROWS[1]


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [..., K]`` and ``weight [N, K]``, as ``F.linear``."""
    rows = x.numel() // max(1, x.shape[-1])
    if (not _plain and x.device.type == "cpu" and _transposed(rows, weight.shape[0])
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return nn.functional.linear(x, weight, bias)


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`project` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def use_small_batch_linears(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` of ``model`` computes through :func:`project` from now on (in
    place: the modules keep their parameters; idempotent). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
    return model


@contextmanager
def plain_linears():
    """Within: every :class:`SmallBatchLinear` computes as ``F.linear`` (a baseline measured as
    its users run it, for instance Hugging Face ``generate`` of the same target)."""
    global _plain
    _plain += 1
    try:
        yield
    finally:
        _plain -= 1


def _compare() -> None:  # pragma: no cover - a measurement, run by hand
    import statistics
    import time

    def ms(f, n=15):
        for _ in range(3):
            f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n, k in ((49152, 576), (8192, 576), (1536, 576), (576, 1536), (576, 576)):
        weights = [torch.randn(n, k) for _ in range(max(1, (64 << 20) // (4 * n * k)))]  # past the caches
        for m in (1, 2, 4, 6, 8, 16, 64):
            x = torch.randn(m, k)
            plain = ms(lambda: [nn.functional.linear(x, w) for w in weights]) / len(weights)
            ours = ms(lambda: [project(x, w) for w in weights]) / len(weights)
            print(f"N={n:6} K={k:5} M={m:3}: F.linear {plain:7.3f} ms  project {ours:7.3f} ms  ({plain / ours:.2f}x)")


if __name__ == "__main__":  # pragma: no cover
    _compare()
