"""The service configuration: YAML with environment overrides, typed and validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["DrafterSpec", "ServiceConfig", "load_config", "resolve_beside", "CONFIGS", "DEFAULT_CONFIG", "KNOWN_KEYS"]

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


# Every key a service YAML may hold, by section: a misspelt key is an error, not a silent default.
KNOWN_KEYS = {
    "": {"target", "drafters", "serving", "redis", "registry", "workers", "learner"},
    "target": {"id", "model"},
    "drafters[]": {"id", "model"},
    "serving": {"host", "port", "k", "k_max", "feedback_topk", "max_active", "max_queue", "prefill_tokens", "kv_cache_tokens", "device", "dtype",
                "max_prompt_tokens",
                "max_tokens", "threads", "rollback", "rollback_margin", "rollback_min_drafted", "admin_token",
                "api_keys", "suffix", "explore"},
    "redis": {"url", "stream_maxlen"},
    "workers": {"count", "threads", "round_records", "period", "nice"},
}


def _check_keys(path: Path, raw: dict) -> None:
    sections = [("", raw), ("target", raw.get("target")), ("serving", raw.get("serving")),
                ("redis", raw.get("redis")), ("workers", raw.get("workers")),
                *(("drafters[]", d) for d in raw.get("drafters") or [])]
    for name, section in sections:
        if not isinstance(section, dict):
            continue
        unknown = sorted(set(section) - KNOWN_KEYS[name])
        if unknown:
            where = f"{name}." if name else ""
            raise ValueError(f"{path}: unknown key {where}{unknown[0]}; known {name or 'top-level'} keys: "
                             f"{', '.join(sorted(KNOWN_KEYS[name]))}")
    from onlinespec.suffix import SuffixConfig

    SuffixConfig.from_dict((raw.get("serving") or {}).get("suffix"))  # its own keys and values, named


def load_config(path: str | Path | None = None) -> ServiceConfig:
    path = Path(path or os.environ.get("ONLINESPEC_CONFIG") or DEFAULT_CONFIG)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a service config is a mapping of keys")
    _check_keys(path, raw)
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
