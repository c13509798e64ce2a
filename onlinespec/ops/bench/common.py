"""Helpers shared by the benchmarks: printing figures and the final JSON line."""

from __future__ import annotations

import json
import os
import platform

from dataclasses import dataclass

import torch

__all__ = ["set_threads", "machine", "emit", "Setup", "setup", "heldout_prompts"]


def set_threads(n: int | None) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo``, else ``platform.processor()``): which small-batch
    product is faster, and so most figures, depend on it (:mod:`onlinespec.cpu_linear`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def emit(table: list[tuple[str, object]], result: dict, as_json: bool) -> None:
    width = max((len(k) for k, _ in table), default=0)
    for key, value in table:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if as_json:
        print(json.dumps(result, sort_keys=True))


def heldout_prompts(tokenizer, domain: str, n: int) -> list[list[int]]:
    """``n`` held-out demo prompts of a domain, spread over the file, as token ids."""
    from onlinespec.demo.prompts import load_prompts

    rows = load_prompts(domain)
    step = max(1, len(rows) // n)
    return [tokenizer.encode(r.text) for r in rows[::step][:n]]


@dataclass(frozen=True)
class Setup:
    threads: int
    target_name: str
    drafter_name: str
    tokenizer: object
    target: object
    drafter: object
    prompts: list[list[int]]
    max_new_tokens: int


def setup(args) -> Setup:
    """What every benchmark starts from: threads, models (demo by default), held-out prompts."""
    threads = set_threads(args.threads)
    from onlinespec.models import load_model, load_tokenizer

    target_name = args.target or "demo:target"
    drafter_name = args.drafter or "demo:drafter-1l"
    tokenizer = load_tokenizer(target_name)
    n = args.prompts or (4 if args.quick else 16)
    return Setup(
        threads=threads, target_name=target_name, drafter_name=drafter_name, tokenizer=tokenizer,
        target=load_model(target_name), drafter=load_model(drafter_name),
        prompts=heldout_prompts(tokenizer, args.domain, n),
        max_new_tokens=args.max_new_tokens or (32 if args.quick else 96),
    )
