"""Held-out prompts of the demo domains (never seen in training), shipped with the package."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Prompt", "load_prompts", "PROMPTS_FILE"]

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"


@dataclass(frozen=True)
class Prompt:
    domain: str
    source: str
    text: str


def load_prompts(domain: str | None = None, path: Path = PROMPTS_FILE) -> list[Prompt]:
    rows = [Prompt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if domain is not None:
        rows = [r for r in rows if r.domain == domain]
        if not rows:
            raise ValueError(f"no held-out prompts of domain {domain!r} in {path}")
    return rows
