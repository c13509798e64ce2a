"""Where models run and in which precision: ``device: auto | cpu | cuda``, ``dtype: float32 |
bfloat16 | float16`` (service config ``serving.device`` / ``serving.dtype``). CPU and float32 are
the defaults and the tested path; ``auto`` takes the GPU when there is one."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None) -> str:
    name = (name or "cpu").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}); "
                             "use device: auto or cpu")
        return name
    raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")


def resolve_dtype(name: str | None) -> torch.dtype:
    try:
        return DTYPES[(name or "float32").lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None
