"""The service configuration: YAML with environment overrides, typed and validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["DrafterSpec", "ServiceConfig", "load_config", "resolve_beside", "CONFIGS", "DEFAULT_CONFIG"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/ (not in a wheel)
DEFAULT_CONFIG = CONFIGS / "demo.yaml"


@dataclass(frozen=True)
class DrafterSpec:
    id: str
    model: str


@dataclass(frozen=True)
class ServiceConfig:
    target_id: str
    target_model: str
    drafters: tuple[DrafterSpec, ...]
    serving: dict
    redis_url: str | None
    stream_maxlen: int
    registry: str
    workers: dict
    learner: str | None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def admin_token(self) -> str | None:
        return os.environ.get("ONLINESPEC_ADMIN_TOKEN") or self.serving.get("admin_token")

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Keys accepted on /v1 (``ONLINESPEC_API_KEYS``, comma-separated, or ``serving.api_keys``);
        empty: any key is accepted (each key still scopes its own suffix speculation)."""
        raw = os.environ.get("ONLINESPEC_API_KEYS")
        keys = raw.split(",") if raw else list(self.serving.get("api_keys") or [])
        return tuple(str(k).strip() for k in keys if str(k).strip())


def resolve_beside(yaml_path: str | Path, relative: str) -> str:
    """A path named inside a YAML file: absolute as is; relative to the repository root for a
    file in a ``configs/`` directory (``learner: configs/learner.yaml``), else to its directory."""
    if Path(relative).is_absolute():
        return relative
    here = Path(yaml_path).resolve().parent
    return str((here.parent if here.name == "configs" else here) / relative)


def load_config(path: str | Path | None = None) -> ServiceConfig:
    path = Path(path or os.environ.get("ONLINESPEC_CONFIG") or DEFAULT_CONFIG)
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        target = raw["target"]
        drafters = tuple(DrafterSpec(str(d["id"]), str(d["model"])) for d in raw.get("drafters", []))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: needs target.id, target.model and drafters[].id/model ({exc})") from None
    if len({d.id for d in drafters}) != len(drafters):
        raise ValueError(f"{path}: drafter ids must be unique")
    learner = raw.get("learner")
    if learner:
        learner = resolve_beside(path, learner)
    registry = os.environ.get("ONLINESPEC_REGISTRY") or raw.get("registry") or ".onlinespec/registry"
    return ServiceConfig(
        target_id=os.environ.get("ONLINESPEC_TARGET_ID") or str(target["id"]),
        target_model=os.environ.get("ONLINESPEC_TARGET_MODEL") or str(target["model"]),
        drafters=drafters,
        serving=dict(raw.get("serving") or {}),
        redis_url=os.environ.get("REDIS_URL") or (raw.get("redis") or {}).get("url"),
        stream_maxlen=int((raw.get("redis") or {}).get("stream_maxlen", 100_000)),
        registry=registry,
        workers=dict(raw.get("workers") or {}),
        learner=learner,
        source=str(path),
    )
