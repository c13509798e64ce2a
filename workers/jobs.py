"""RQ job functions. Arguments are ids only (JSON serializer); models live in the worker.

Every round runs inside :func:`_guarded`: while it runs, a heartbeat keeps the drafter's
in-flight mark alive for ``HEARTBEAT_TTL`` seconds at a time, so a worker killed mid-round
frees the drafter within that time instead of the whole job timeout; whatever the round does,
the mark is cleared when it ends. A failed round is counted (``failed_rounds`` in the drafter's
health hash, shown in ``/metrics`` and the dashboard) and sets a backoff (2 s doubling to 5
minutes with consecutive failures) after which the trigger enqueues the next round: that is the
retry, and its records are the failed round's, still pending.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict

from onlinespec.feedback import keys
from onlinespec.background import Background
from onlinespec.learn.learner import LearnerConfig
from onlinespec.redis_server import connect
from onlinespec.learn.registry import Registry
from onlinespec.learn.round import POOL, PoolUpdater, Updater

__all__ = ["update_drafter", "update_pool", "tune_trials", "configure", "HEARTBEAT_TTL", "backoff_seconds"]

log = logging.getLogger(__name__)

HEARTBEAT_TTL = 30  # seconds a killed worker's round keeps its drafter marked in flight
_updaters: dict[str, Updater] = {}
_pools: dict[str, PoolUpdater] = {}
_settings: dict = {}


def backoff_seconds(consecutive_failures: int) -> float:
    """Wait before the retry after the n-th failure in a row: 2, 4, 8, ... capped at 300 s."""
    return min(2.0 * 2 ** max(0, consecutive_failures - 1), 300.0)


def configure(redis_url: str | None = None, registry_root: str | None = None, round_records: int | None = None,
              min_idle_ms: int | None = None, learner_config: str | None = None,
              drafter_configs: dict | None = None) -> None:
    """Called once by the worker entry point; jobs fall back to the environment otherwise."""
    _settings.update({k: v for k, v in dict(redis_url=redis_url, registry_root=registry_root,
                                             round_records=round_records, min_idle_ms=min_idle_ms,
                                             learner_config=learner_config, drafter_configs=drafter_configs).items() if v})
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
            drafter_configs=_settings.get("drafter_configs"),
        )
    return _updaters[target]


def _guarded(redis, drafter: str, run):
    """Run one round with a heartbeat on the in-flight mark; count and back off on failure."""
    from rq import get_current_job

    job = get_current_job()
    mark, token = keys.inflight_key(drafter), job.id if job is not None else "direct"
    # Redis away: logged and counted, the round fails on its own
    heartbeat = Background(f"heartbeat-{drafter}", lambda: redis.set(mark, token, ex=HEARTBEAT_TTL),
                           period=HEARTBEAT_TTL / 3, log=log).start()
    health = keys.health_key(drafter)
    try:
        result = run()
        redis.pipeline().hincrby(health, "rounds", 1).hset(health, "consecutive_failures", 0).execute()
        return result
    except Exception as exc:
        try:
            pipe = redis.pipeline()
            pipe.hincrby(health, "failed_rounds", 1)
            pipe.hincrby(health, "consecutive_failures", 1)
            pipe.hset(health, "last_error", f"{type(exc).__name__}: {exc}"[:500])
            n = int(pipe.execute()[1])
            redis.set(keys.backoff_key(drafter), n, ex=max(1, round(backoff_seconds(n))))
            log.error("round of %s failed (%d in a row; retry in %.0fs): %s", drafter, n, backoff_seconds(n), exc)
        except Exception:  # noqa: BLE001 - Redis away too: the mark's expiry still frees the drafter
            log.exception("could not record the failed round of %s", drafter)
        raise
    finally:
        heartbeat.stop()
        try:
            redis.delete(mark)
        except Exception:  # noqa: BLE001 - the heartbeat stopped: the mark expires by itself
            pass


def update_drafter(target: str, drafter: str) -> dict:
    """One learning round of one drafter."""
    updater = _updater(target)
    result = _guarded(updater.redis, drafter, lambda: updater.run_round(drafter))
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
    return asdict(_guarded(pool.redis, POOL, pool.run_round))


def tune_trials(study_dir: str) -> int:
    """Run trials of a tuning study (``onlinespec tune run --workers N``) until it has all it
    asked for; several workers share one study through its journal. Returns the trials run here."""
    from onlinespec.learn.tune.study import TuningStudy

    done = TuningStudy(study_dir).optimize()
    log.info("tuning study %s: %d trials run here", study_dir, done)
    return done
