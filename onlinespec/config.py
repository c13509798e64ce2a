"""The service configuration: one typed home for every setting, its default and where it came from.

A service YAML (``configs/demo.yaml``) is read into :class:`ServiceConfig`: typed sections
(:class:`ServingConfig`, :class:`WorkersConfig`, :class:`RedisConfig`, the suffix settings of
:class:`~onlinespec.decode.suffix.SuffixConfig`) whose dataclass fields hold every default, once. A key
the sections do not know is an error that names it; a value of the wrong type too. The server,
the workers, ``onlinespec up``, the benches and the tests all load it with :func:`load_config`.

Environment overrides (applied after the file; :attr:`ServiceConfig.sources` records which
won): any key as ``ONLINESPEC_<SECTION>__<KEY>`` (``ONLINESPEC_SERVING__K_MAX=4``,
``ONLINESPEC_WORKERS__ROUND_RECORDS=8``, ``ONLINESPEC_SERVING__SUFFIX__SCOPE=shared``; values
read as YAML scalars), plus the short names ``REDIS_URL``, ``ONLINESPEC_REGISTRY``,
``ONLINESPEC_TARGET_ID``, ``ONLINESPEC_TARGET_MODEL``, ``ONLINESPEC_ADMIN_TOKEN``,
``ONLINESPEC_API_KEYS`` (comma-separated), ``ONLINESPEC_HOST`` and ``ONLINESPEC_PORT``.
``onlinespec config show`` prints the effective configuration with each value's source.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onlinespec.decode.suffix import SuffixConfig

__all__ = ["DrafterSpec", "VllmConfig", "ServingConfig", "WorkersConfig", "RedisConfig", "ServiceConfig", "load_config",
           "resolve_beside", "CONFIGS", "DEFAULT_CONFIG", "DEFAULT_REGISTRY", "KNOWN_KEYS", "SECRETS"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/ (not in a wheel)
DEFAULT_CONFIG = CONFIGS / "demo.yaml"
DEFAULT_REGISTRY = ".onlinespec/registry"  # the server's and the workers' alike


@dataclass(frozen=True)
class DrafterSpec:
    id: str
    model: str
    # this drafter's learner settings over the learner YAML's (``learner:``), as a mapping of
    # LearnerConfig keys (``loss`` and ``optim`` merged key by key: LearnerConfig.merged): what
    # the server seeds the drafter's live settings with on its first start (the admin API changes
    # them later); checked by onlinespec.learn.learner.drafter_learner_configs when the server, a
    # worker or `onlinespec config show` starts
    learner: dict = field(default_factory=dict, hash=False)


ENGINES = ("embedded", "vllm")


@dataclass(frozen=True)
class VllmConfig:
    """``serving.engine: vllm`` (:mod:`serving.vllm_loop`): vLLM's own engine arguments that matter here."""

    num_speculative_tokens: int = 3  # the most drafts a request gets a step (vLLM's speculative k)
    gpu_memory_utilization: float = 0.3  # on the CPU backend: the share of memory vLLM may reserve
    kv_cache_memory_bytes: int | None = None  # the key/value cache size (None: from the utilization)
    max_model_len: int | None = None  # None: serving.max_prompt_tokens + serving.max_tokens
    enforce_eager: bool = True  # no compilation: a 30 s start on the CPU, not 2 minutes
    tensor_parallel_size: int = 1  # > 1: vLLM's workers in processes of their own, each with the drafters
    multiprocessing: bool = False  # vLLM's engine core in a process of its own (always with tensor parallelism)

    @property
    def in_process(self) -> bool:
        """vLLM's model runner (and OnlineSpec's proposer) in the server's process: drafters shared."""
        return not self.multiprocessing and self.tensor_parallel_size == 1

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"vllm.num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class ServingConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    k: int | None = None  # None: adaptive draft length per drafter, bounded by k_max
    k_max: int = 8
    feedback_topk: int = 32  # target log-probs kept per generated position
    max_active: int = 8  # requests batched together
    max_queue: int = 64  # waiting requests beyond this get 429
    # requests one tenant (API key, and ``user`` within it) may have in flight, waiting or running;
    # beyond, that tenant's next ones get 429 while others are served (None: no cap)
    max_requests_per_tenant: int | None = None
    prefill_tokens: int = 256  # prompt tokens prefilled per step
    drafter_context: int | None = None  # tokens of a request's text a drafter encodes when it joins (None: all)
    # share of requests whose target features go beside their record for feature drafters' learners
    # (None: 0.25 when a configured drafter is a feature drafter, else 0); each kept features_ttl seconds
    capture_features: float | None = None
    features_ttl: int = 300
    kv_cache_tokens: int | None = None  # key/value positions requests may reserve together
    prefix_cache_tokens: int = 2048  # positions of text read before kept for prompts that begin alike (0: off)
    prefix_cache_scope: str = "shared"  # shared | tenant: who reads what it keeps
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    max_request_bytes: int = 8 << 20  # request bodies beyond get a 413 (8 MiB: 128 full prompts fit)
    threads: int = 0  # torch threads for the engine; 0: all cores
    device: str = "cpu"  # auto | cpu | cuda[:N]
    dtype: str = "float32"  # float32 | bfloat16 | float16
    explore: float = 0.05  # share of requests given a drafter drawn uniformly
    rollback: bool = True
    rollback_margin: float = 0.05
    rollback_min_drafted: int = 2000
    admin_token: str | None = None
    api_keys: tuple[str, ...] = ()  # keys accepted on /v1; empty: any key
    suffix: SuffixConfig = field(default_factory=SuffixConfig)
    engine: str = "embedded"  # embedded | vllm (its own virtualenv: ./run vllm-setup)
    # seconds a stop gives in-flight requests, then as long to what the server owns (vLLM's
    # processes, threads); past that it exits 1, its threads' stacks on stderr, its children killed
    stop_timeout: float = 15.0
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.drafter_context is not None and self.drafter_context < 1:
            raise ValueError(f"drafter_context must be >= 1 or null (all), got {self.drafter_context}")
        if self.capture_features is not None and not 0.0 <= self.capture_features <= 1.0:
            raise ValueError(f"capture_features is a share in [0, 1] or null (auto), got {self.capture_features}")
        if self.features_ttl < 1:
            raise ValueError(f"features_ttl must be >= 1 second, got {self.features_ttl}")
        if self.prefix_cache_scope not in ("shared", "tenant"):
            raise ValueError(f"prefix_cache_scope must be shared or tenant, got {self.prefix_cache_scope!r}")
        if self.stop_timeout <= 0:
            raise ValueError(f"stop_timeout is a positive number of seconds, got {self.stop_timeout}")
        if self.max_requests_per_tenant is not None and self.max_requests_per_tenant < 1:
            raise ValueError(f"max_requests_per_tenant must be >= 1 or null (no cap), got {self.max_requests_per_tenant}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (0: no prefix cache), got {self.prefix_cache_tokens}")


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 1
    threads: int = 1
    round_records: int = 16  # records per learning round
    period: float = 10.0  # seconds: a round runs at least this often when feedback waits
    nice: int = 10  # CPU priority below the server's
    budget: float = 1.0  # share of one core a worker's jobs may take on average (< 1: it rests between them)

    def __post_init__(self):
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"workers.budget is a share of one core in (0, 1], got {self.budget}")


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None in `onlinespec up`: a private redis-server
    stream_maxlen: int = 100_000


@dataclass(frozen=True)
class ServiceConfig:
    target_id: str
    target_model: str
    drafters: tuple[DrafterSpec, ...]
    serving: ServingConfig = field(default_factory=ServingConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    registry: str = DEFAULT_REGISTRY
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    learner: str | None = None  # learner defaults YAML (resolved path)
    source: str = ""
    sources: dict = field(default_factory=dict, compare=False)  # dotted key -> "default" | file | "env NAME"

    @property
    def redis_url(self) -> str | None:
        return self.redis.url

    @property
    def stream_maxlen(self) -> int:
        return self.redis.stream_maxlen

    @property
    def admin_token(self) -> str | None:
        return self.serving.admin_token

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Keys accepted on /v1; empty: any key is accepted (each key still scopes its own suffix speculation)."""
        return self.serving.api_keys

    def effective(self) -> list[tuple[str, object, str]]:
        """(dotted key, value, source) for every setting, secrets included (see :data:`SECRETS`)."""
        rows = [("target.id", self.target_id), ("target.model", self.target_model)]
        rows += [(f"drafters[{i}]", f"{d.id}: {d.model}" + (f" (learner: {d.learner})" if d.learner else ""))
                 for i, d in enumerate(self.drafters)]
        for name, section in (("serving", self.serving), ("redis", self.redis), ("workers", self.workers)):
            rows += list(_flat(name, section))
        rows += [("registry", self.registry), ("learner", self.learner)]
        return [(k, v, self.sources.get(k if not k.startswith("drafters[") else "drafters", "default"))
                for k, v in rows]


SECRETS = {"serving.admin_token", "serving.api_keys", "redis.url"}
SECTIONS = {"serving": ServingConfig, "workers": WorkersConfig, "redis": RedisConfig}
# short environment names kept from before the generic ONLINESPEC_<SECTION>__<KEY> form
ENV_NAMES = {"REDIS_URL": "redis.url", "ONLINESPEC_REGISTRY": "registry", "ONLINESPEC_TARGET_ID": "target.id",
             "ONLINESPEC_TARGET_MODEL": "target.model", "ONLINESPEC_ADMIN_TOKEN": "serving.admin_token",
             "ONLINESPEC_API_KEYS": "serving.api_keys", "ONLINESPEC_HOST": "serving.host",
             "ONLINESPEC_PORT": "serving.port", "ONLINESPEC_WORKER_THREADS": "workers.threads",
             "ONLINESPEC_ROUND_RECORDS": "workers.round_records", "ONLINESPEC_UPDATE_PERIOD": "workers.period",
             "ONLINESPEC_WORKER_NICE": "workers.nice", "ONLINESPEC_LEARNER_CONFIG": "learner"}


class EnvValue(str):
    """A value from the environment: text, read as a YAML scalar where the setting is not text."""


def _flat(prefix: str, obj):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flat(f"{prefix}.{f.name}", value)
        else:
            yield f"{prefix}.{f.name}", value


def _known(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# Every key a service YAML may hold, by section: a misspelt key is an error, not a silent default.
KNOWN_KEYS = {
    "": {"target", "drafters", "serving", "redis", "registry", "workers", "learner"},
    "target": {"id", "model"},
    "drafters[]": {"id", "model", "learner"},
    **{name: _known(cls) for name, cls in SECTIONS.items()},
    "serving.suffix": _known(SuffixConfig),
    "serving.vllm": _known(VllmConfig),
}


def resolve_beside(yaml_path: str | Path, relative: str) -> str:
    """A path named inside a YAML file: absolute as is; relative to the repository root for a
    file in a ``configs/`` directory (``learner: configs/learner.yaml``), else to its directory."""
    if Path(relative).is_absolute():
        return relative
    here = Path(yaml_path).resolve().parent
    return str((here.parent if here.name == "configs" else here) / relative)


def _coerce(key: str, value, typ):
    """``value`` as ``typ`` (int, float, bool, str, tuple[str, ...], Optional of those), or a
    ValueError naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if isinstance(value, EnvValue) and typ is not str and origin is not tuple and str not in args:
        try:
            value = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            value = str(value)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{key}: a list, got {value!r}")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _section(name: str, cls, raw: dict, sources: dict, where: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _section(key, hints[f.name], raw.get(f.name) or {}, sources, where)
            continue
        if f.name in raw:
            values[f.name] = _coerce(key, raw[f.name], hints[f.name])
            sources.setdefault(key, where)
        else:
            sources.setdefault(key, "default")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from None


def _check_keys(path: Path, raw: dict) -> None:
    serving = raw.get("serving") if isinstance(raw.get("serving"), dict) else {}
    sections = [("", raw), ("target", raw.get("target")), ("serving", raw.get("serving")),
                ("redis", raw.get("redis")), ("workers", raw.get("workers")), ("serving.suffix", serving.get("suffix")),
                ("serving.vllm", serving.get("vllm")),
                *(("drafters[]", d) for d in raw.get("drafters") or [])]
    for name, section in sections:
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {name or 'the file'} must be a mapping of keys, got {section!r}")
        unknown = sorted(set(section) - KNOWN_KEYS[name])
        if unknown:
            where = f"{name}." if name else ""
            raise ValueError(f"{path}: unknown key {where}{unknown[0]}; known {name or 'top-level'} keys: "
                             f"{', '.join(sorted(KNOWN_KEYS[name]))}")
        if name == "drafters[]" and not isinstance(section.get("learner") or {}, dict):
            raise ValueError(f"{path}: drafters[{section.get('id')}].learner must be a mapping of learner settings, "
                             f"got {section['learner']!r}")


def _env_overrides(raw: dict, sources: dict, environ) -> None:
    """Apply environment overrides onto the raw mapping, recording their sources."""
    def put(dotted: str, value, name: str) -> None:
        parts = dotted.split(".")
        d = raw
        for p in parts[:-1]:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        d[parts[-1]] = value
        sources[dotted] = f"env {name}"

    for name in sorted(environ):
        if name.startswith("ONLINESPEC_") and "__" in name:
            dotted = name.removeprefix("ONLINESPEC_").lower().replace("__", ".")
            section = dotted.split(".")[0]
            if section not in SECTIONS and section not in ("target",):
                raise ValueError(f"environment {name}: no section {section!r}; one of "
                                 f"{', '.join(sorted([*SECTIONS, 'target']))}")
            put(dotted, EnvValue(environ[name]), name)
    for name, dotted in ENV_NAMES.items():
        if environ.get(name):
            put(dotted, EnvValue(environ[name]), name)


def load_config(path: str | Path | None = None, environ=None) -> ServiceConfig:
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("ONLINESPEC_CONFIG") or DEFAULT_CONFIG)
    if not path.is_file():
        raise ValueError(f"no service config at {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a service config is a mapping of keys")
    _check_keys(path, raw)
    where = str(path)
    sources: dict[str, str] = {}
    for key in ("target.id", "target.model", "drafters", "registry", "learner"):
        head, _, tail = key.partition(".")
        if head in raw and (not tail or tail in (raw.get(head) or {})):
            sources[key] = where
    _env_overrides(raw, sources, environ)
    _check_keys(path, raw)  # again: a generic environment name may have added a key
    try:
        target = raw["target"]
        drafters = tuple(DrafterSpec(str(d["id"]), str(d["model"]), dict(d.get("learner") or {}))
                         for d in raw.get("drafters") or [])
        target_id, target_model = str(target["id"]), str(target["model"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: needs target.id, target.model and drafters[].id/model ({exc})") from None
    if len({d.id for d in drafters}) != len(drafters):
        raise ValueError(f"{path}: drafter ids must be unique")
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = _section(name, cls, raw.get(name) or {}, sources, where)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    learner = raw.get("learner")
    if learner:
        learner = resolve_beside(path, str(learner))
    sources.setdefault("registry", "default")
    sources.setdefault("learner", "default")
    return ServiceConfig(target_id=target_id, target_model=target_model, drafters=drafters,
                         serving=sections["serving"], redis=sections["redis"], registry=str(raw.get("registry") or DEFAULT_REGISTRY),
                         workers=sections["workers"], learner=learner, source=str(path), sources=sources)

