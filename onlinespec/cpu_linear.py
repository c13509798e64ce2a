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
forward at one row: 56 ms for one position, 114 / 143 / 148 ms for 2 / 3 / 5; with the
transposed product 61 / 96 / 108 ms).

**Which product is faster depends on the CPU, so it is measured on the machine at hand.** On a
2-core Intel Xeon (AVX-512, the same torch and MKL) the picture is reversed: ``F.linear`` at 2
rows costs what it costs at one, and ``(W @ x.T).T`` is 2-3x slower at 2-4 rows for every
SmolLM2 weight (0.11 vs 0.04 ms for 576 x 576; 1.6 vs 0.5 ms for the 8192-token head), so rules
fitted on the EPYC made a 2-row plain step there cost 87 ms against 48 at one row.
:func:`calibrate` times both products for each weight shape (the model's own weights of that
shape, one pass over all of them as a forward reads them) at the row counts of
:data:`ROW_BUCKETS`, interleaved, and :func:`project` takes the transposed product for a row
count only where it measured at least 10% faster (``F.linear`` stays the default: noise must not
flip a decision toward the unusual product). :func:`use_small_batch_linears` calibrates the
model's shapes once per process (SmolLM2's five shapes: about 2 s); a weight of a shape not
calibrated is calibrated alone at its first product of a few rows; weights of fewer than
:data:`MIN_WEIGHTS` elements (the tests' tiny models) always take ``F.linear``.
``python -m onlinespec.cpu_linear`` prints the comparison and the decisions on the machine at hand.

The result is the same product summed in another order: within float rounding, as a batched
forward is from a one-row forward (the lossless tests cover both). GPUs and gradients take the
plain path.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["project", "SmallBatchLinear", "use_small_batch_linears", "plain_linears", "calibrate", "decisions",
           "ROW_BUCKETS", "MIN_WEIGHTS"]

# Row counts measured: a product of M rows follows the decision of the smallest bucket >= M
# (M = 1 is the matrix-vector product both compute alike; beyond the last bucket, F.linear: a
# prefill's hundreds of rows, where MKL's GEMM is at its best).
ROW_BUCKETS = (2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48)
MIN_WEIGHTS = 1 << 18  # elements below which F.linear is taken uncalibrated (cached, a few microseconds)
MARGIN = 0.9  # the transposed product is taken where it measured at most this share of F.linear's time
_REPEATS = 3
_STREAM_BYTES = 32 << 20  # the weights of one shape timed together: past a core's own caches, as a forward
_plain = 0  # inside plain_linears(): F.linear everywhere
# per (out, in, dtype): the row buckets where the transposed product measured faster
_faster: dict[tuple[int, int, torch.dtype], frozenset[int]] = {}


def _key(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return weight.shape[0], weight.shape[1], weight.dtype


def _bucket(rows: int) -> int | None:
    i = bisect.bisect_left(ROW_BUCKETS, rows)
    return ROW_BUCKETS[i] if i < len(ROW_BUCKETS) else None


def _transposed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x [M, K]`` computed as ``(weight @ x.T).T`` (contiguous)."""
    return torch.mm(weight, x.t()).t().contiguous()


def _transposed(rows: int, weight: torch.Tensor) -> bool:
    if rows < 2 or rows > ROW_BUCKETS[-1] or weight.numel() < MIN_WEIGHTS:
        return False
    key = _key(weight)
    if key not in _faster:
        calibrate([weight])
    return _bucket(rows) in _faster[key]


def decisions() -> dict[tuple[int, int, torch.dtype], tuple[int, ...]]:
    """What :func:`calibrate` decided so far: per weight shape, the row buckets of the transposed product."""
    return {key: tuple(sorted(b)) for key, b in _faster.items()}


@torch.no_grad()
def calibrate(weights: list[torch.Tensor], force: bool = False) -> dict[tuple[int, int, torch.dtype], tuple[int, ...]]:
    """Time ``F.linear`` and the transposed product at each of :data:`ROW_BUCKETS` for every shape
    among ``weights`` (CPU weights of at least :data:`MIN_WEIGHTS` elements; a shape calibrated
    before is kept unless ``force``), all weights of a shape in one pass, up to
    :data:`_STREAM_BYTES` of them, as a forward streams them; the two products interleaved, the
    fastest of :data:`_REPEATS` passes each (a shared machine's noise only ever slows a pass).
    Returns the decisions for the shapes given."""
    groups: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for w in weights:
        if w.device.type == "cpu" and w.dim() == 2 and w.numel() >= MIN_WEIGHTS:
            groups[_key(w)].append(w.detach())
    for key, group in groups.items():
        if key in _faster and not force:
            continue
        stream, size = [], 0
        for w in group:
            if size >= _STREAM_BYTES:
                break
            stream.append(w)
            size += w.numel() * w.element_size()
        faster, timings = set(), []
        for rows in ROW_BUCKETS:
            x = torch.randn(rows, key[1], dtype=key[2])
            plain = lambda: [nn.functional.linear(x, w) for w in stream]  # noqa: E731
            transposed = lambda: [_transposed_product(x, w) for w in stream]  # noqa: E731
            plain(), transposed()  # warm: the first products allocate
            best = [float("inf"), float("inf")]
            for _ in range(_REPEATS):
                for i, f in enumerate((plain, transposed)):
                    t = time.perf_counter()
                    f()
                    best[i] = min(best[i], time.perf_counter() - t)
            if best[1] <= MARGIN * best[0]:
                faster.add(rows)
            timings.append(f"{rows}: {1000 * best[0]:.2f}/{1000 * best[1]:.2f}")
        _faster[key] = frozenset(faster)
        # the decision rests on timings of a shared machine: logged, so a slow server can be checked
        log.info("small-batch linears, weight %s x %s: transposed product at rows %s (ms F.linear/transposed "
                 "per pass of %d weights: %s)", key[0], key[1], sorted(faster) or "none", len(stream),
                 ", ".join(timings))
    return {key: tuple(sorted(_faster[key])) for key in groups}


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [..., K]`` and ``weight [N, K]``, as ``F.linear``."""
    rows = x.numel() // max(1, x.shape[-1])
    if (not _plain and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and _transposed(rows, weight)):
        out = _transposed_product(x.reshape(rows, x.shape[-1]), weight)
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return nn.functional.linear(x, weight, bias)


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`project` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def use_small_batch_linears(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` of ``model`` computes through :func:`project` from now on (in
    place: the modules keep their parameters; idempotent), its weights' shapes calibrated on this
    CPU (:func:`calibrate`, once per process and shape). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
    calibrate([m.weight for m in model.modules() if isinstance(m, SmallBatchLinear)])
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
            transposed = ms(lambda: [_transposed_product(x, w) for w in weights]) / len(weights)
            print(f"N={n:6} K={k:5} M={m:3}: F.linear {plain:7.3f} ms  (W @ x.T).T {transposed:7.3f} ms  "
                  f"({plain / transposed:.2f}x)  project {ours:7.3f} ms")
        print(f"  transposed at rows {calibrate(weights, force=True)[(n, k, torch.float32)]}")


if __name__ == "__main__":  # pragma: no cover
    _compare()
