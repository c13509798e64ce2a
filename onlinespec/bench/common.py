"""Helpers shared by the benchmarks: printing figures and the final JSON line."""

from __future__ import annotations

import json
import os
import platform

import torch

__all__ = ["set_threads", "machine", "emit"]


def set_threads(n: int | None) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def emit(table: list[tuple[str, object]], result: dict, as_json: bool) -> None:
    width = max(len(k) for k, _ in table)
    for key, value in table:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if as_json:
        print(json.dumps(result, sort_keys=True))
