"""RQ job functions. Arguments are ids only (JSON serializer); models live in the worker."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict

from onlinespec import keys
from onlinespec.learn.learner import LearnerConfig
from onlinespec.redis_server import connect
from onlinespec.registry import Registry
from onlinespec.update import POOL, PoolUpdater, Updater

__all__ = ["update_drafter", "update_pool", "configure"]

_updaters: dict[str, Updater] = {}
_pools: dict[str, PoolUpdater] = {}
_settings: dict = {}


def configure(redis_url: str | None = None, registry_root: str | None = None, round_records: int | None = None,
              min_idle_ms: int | None = None, learner_config: str | None = None) -> None:
    """Called once by the worker entry point; jobs fall back to the environment otherwise."""
    _settings.update({k: v for k, v in dict(redis_url=redis_url, registry_root=registry_root,
                                             round_records=round_records, min_idle_ms=min_idle_ms,
                                             learner_config=learner_config).items() if v})
    _updaters.clear()
    _pools.clear()


def _updater(target: str) -> Updater:
    if target not in _updaters:
        client = connect(_settings.get("redis_url") or os.environ.get("REDIS_URL"))
        root = _settings.get("registry_root") or os.environ.get("ONLINESPEC_REGISTRY", "registry")
        path = _settings.get("learner_config") or os.environ.get("ONLINESPEC_LEARNER_CONFIG")
        _updaters[target] = Updater(
            client, Registry(root, client), target, consumer=f"{socket.gethostname()}-{os.getpid()}",
            round_records=int(_settings.get("round_records") or os.environ.get("ONLINESPEC_ROUND_RECORDS", 16)),
            min_idle_ms=int(_settings.get("min_idle_ms") or os.environ.get("ONLINESPEC_MIN_IDLE_MS", 60_000)),
            default_config=LearnerConfig.from_yaml(path) if path else None,
        )
    return _updaters[target]


def update_drafter(target: str, drafter: str) -> dict:
    """One learning round. Clears the drafter's in-flight mark when it completes; after an
    exception the mark stays until its expiry, so RQ's retry stays the only job in flight."""
    updater = _updater(target)
    result = updater.run_round(drafter)
    updater.redis.delete(keys.inflight_key(drafter))
    out = asdict(result)
    out.pop("metrics", None)  # kept in Redis under onlinespec:learner:*; the job result stays small
    return out


def update_pool(target: str) -> dict:
    """One round of the drafter pool's Hedge weights (full information over every drafter)."""
    if target not in _pools:
        base = _updater(target)
        hedge = base.default_config or LearnerConfig()  # the pool's Hedge: hedge_eta, hedge_discount
        _pools[target] = PoolUpdater(base.redis, base.registry, target, base.consumer, base.round_records,
                                     eta=hedge.hedge_eta, min_idle_ms=base.min_idle_ms, discount=hedge.hedge_discount)
    pool = _pools[target]
    result = pool.run_round()
    pool.redis.delete(keys.inflight_key(POOL))
    return asdict(result)
