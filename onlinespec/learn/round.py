"""One learning round for one drafter, end to end through Redis and the registry.

    read feedback (consumer group) -> learner round -> publish version (compare-and-set)
      -> acknowledge the entries -> round metrics to Redis

Acknowledging only after the publish means a worker that dies mid-round loses nothing: its
entries stay pending and are delivered again (to itself, or reclaimed by another worker). The
publish records the entry ids the version learned, atomically with the pointer move, so a
worker that dies between publish and acknowledge costs no second learning of them: the
redelivered entries are acknowledged as already learned.
Learners are kept in memory between rounds (per worker process) and rebuilt from the registry
whenever the latest version is not the one they hold, so any worker can continue any drafter.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from onlinespec.feedback import keys
from onlinespec.feedback.codec import CapturedFeatures, CodecError, decode_features
from onlinespec.feedback.record import FeedbackRecord
from onlinespec.learn.control import POOL, Control
from onlinespec.learn.learner import DrafterLearner, LearnerConfig, records_to_learn
from onlinespec.learn.registry import CheckpointError, PublishConflict, Registry
from onlinespec.faults import failpoint
from onlinespec.feedback.stream import FeedbackReader

__all__ = ["RoundResult", "Updater", "PoolUpdater", "learner_config",
           "learner_health", "already_learned", "POOL"]  # POOL (onlinespec.learn.control): the pool's consumer group reads every record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    drafter: str
    # "published" | "idle" | "paused" | "conflict" | "skipped" (none of the records was its own, or all
    # were already learned by a published version)
    status: str
    version: int | None = None
    parent: int | None = None
    records: int = 0
    dead: int = 0
    seconds: float = 0.0
    metrics: dict | None = None


def needs_features(spec: dict | None) -> bool:
    """Whether a drafter of this registry spec learns only from records with captured target
    features (a feature drafter, :mod:`onlinespec.drafters.feature`)."""
    from onlinespec.drafters.feature import MODEL_TYPE

    return (spec or {}).get("arch", {}).get("model_type") == MODEL_TYPE


def captured_features(redis_client, target: str, records: list[FeedbackRecord], hidden: int | None
                      ) -> tuple[list[FeedbackRecord], list[CapturedFeatures], int]:
    """The records whose captured features are still in Redis and valid for them, with those
    features; and how many had features that were malformed (skipped, logged)."""
    blobs = redis_client.mget([keys.features_key(target, r.request_id) for r in records]) if records else []
    kept, features, bad = [], [], 0
    for record, blob in zip(records, blobs):
        if blob is None:
            continue
        try:
            f = decode_features(blob, hidden)
            if f.start > record.prompt_len or f.start + len(f.values) > len(record.tokens):
                raise CodecError(f"features at {f.start}..{f.start + len(f.values)} do not fit a record of "
                                 f"{len(record.tokens)} tokens")
        except CodecError as exc:
            bad += 1
            log.warning("captured features of %s skipped: %s", record.request_id, exc)
            continue
        kept.append(record)
        features.append(f)
    return kept, features, bad


def learner_health(redis_client, drafter: str) -> dict:
    """Rounds, failed rounds, consecutive failures, the last error, redelivered entries skipped."""
    raw = {k.decode(): v.decode(errors="replace") for k, v in redis_client.hgetall(keys.health_key(drafter)).items()}
    out = {k: int(raw.get(k, 0)) for k in ("rounds", "failed_rounds", "consecutive_failures", "redelivered_skipped")}
    out["last_error"] = raw.get("last_error", "")
    return out


def already_learned(redis_client, drafter: str, ids: list[bytes]) -> set[bytes]:
    """The entries among ``ids`` that a published version of the drafter learned already."""
    if not ids:
        return set()
    scores = redis_client.zmscore(keys.learned_key(drafter), ids)
    return {i for i, score in zip(ids, scores) if score is not None}


def learner_config(redis_client, drafter: str, default: LearnerConfig | None = None) -> LearnerConfig:
    raw = redis_client.get(keys.learner_config(drafter))
    if raw is None:
        return default or LearnerConfig()
    return LearnerConfig.from_dict(json.loads(raw))


class Updater:
    """Runs rounds for any drafter of one target; holds learners between rounds."""

    def __init__(self, redis_client, registry: Registry, target: str, consumer: str,
                 round_records: int = 16, min_idle_ms: int = 60_000, default_config: LearnerConfig | None = None,
                 drafter_configs: dict[str, LearnerConfig] | None = None):
        self.redis = redis_client
        self.registry = registry
        self.target = target
        self.consumer = consumer
        self.round_records = round_records
        self.min_idle_ms = min_idle_ms
        self.default_config = default_config
        # a drafter's own settings from the service config, where Redis holds none (the server seeds them)
        self.drafter_configs = drafter_configs or {}
        self.learners: dict[str, tuple[int, DrafterLearner, str]] = {}  # drafter -> (version, learner, config json)

    def _learner(self, drafter: str, latest: int, config: LearnerConfig) -> DrafterLearner:
        cached = self.learners.get(drafter)
        config_json = json.dumps(config.to_dict(), sort_keys=True)
        if cached and cached[0] == latest and cached[2] == config_json:
            return cached[1]
        model, _ = self.registry.load_model(drafter, latest)
        learner = DrafterLearner(model, config)
        state = self.registry.load_learner_state(drafter, latest)
        if state is not None:
            tensors, meta = state
            if meta.get("config") == config.to_dict():
                learner.load_state(*state)
            else:  # hyperparameters changed: continue from the weights, fresh learner state
                learner.rounds = int(meta.get("rounds", 0))
                learner.estimate.load_state(meta.get("estimate", {}))  # the traffic did not change
        self.learners[drafter] = (latest, learner, config_json)
        return learner

    def run_round(self, drafter: str) -> RoundResult:
        t0 = time.perf_counter()
        if Control(self.redis).paused(drafter):
            return RoundResult(drafter, "paused")
        latest = self.registry.latest(drafter)
        if latest is None:
            raise RuntimeError(f"drafter {drafter!r} has no version: bootstrap it first")
        spec = self.registry.spec(drafter)
        reader = FeedbackReader(self.redis, self.target, drafter, self.consumer, self.min_idle_ms,
                                vocab_size=(spec or {}).get("arch", {}).get("vocab_size"))
        delivery = reader.read(self.round_records)
        if not delivery.records:
            return RoundResult(drafter, "idle", latest, latest, 0, delivery.dead, time.perf_counter() - t0)
        done = already_learned(self.redis, drafter, delivery.ids)
        if done:  # a round that published and died before acknowledging: acknowledge, do not relearn
            reader.ack(sorted(done))
            self.redis.hincrby(keys.health_key(drafter), "redelivered_skipped", len(done))
            log.warning("%s: %d redelivered entries were already learned; acknowledged", drafter, len(done))
            delivery = delivery.without(done)
            if not delivery.records:
                return RoundResult(drafter, "skipped", latest, latest, 0, delivery.dead, time.perf_counter() - t0)
        config = learner_config(self.redis, drafter, self.drafter_configs.get(drafter, self.default_config))
        own = records_to_learn(delivery.records, drafter, config)
        features = None
        if own and needs_features(spec):  # a feature drafter learns from the captured share only
            hidden = (spec or {}).get("arch", {}).get("hidden_size")
            n = len(own)
            own, features, bad = captured_features(self.redis, self.target, own, hidden)
            health = keys.health_key(drafter)
            self.redis.hincrby(health, "without_features", n - len(own) - bad)
            if bad:
                self.redis.hincrby(health, "bad_features", bad)
        if not own:  # learn_from=served and another drafter served all of them, or none was captured
            reader.ack(delivery.ids)
            return RoundResult(drafter, "skipped", latest, latest, len(delivery), delivery.dead,
                               time.perf_counter() - t0)
        try:
            learner = self._learner(drafter, latest, config)
        except CheckpointError:  # its files were lost or damaged: continue from what still loads
            latest = self.registry.recover(drafter)
            learner = self._learner(drafter, latest, config)
        metrics = learner.round(own, features).to_dict()
        failpoint("before_publish", drafter)
        try:
            manifest = self.registry.publish(
                drafter, learner.served_model(), parent=latest, learner_state=learner.state(),
                watermark=delivery.last_id.decode() if delivery.last_id else None, metrics=metrics,
                learned=delivery.ids,
            )
        except PublishConflict:
            self.learners.pop(drafter, None)  # someone else advanced: rebuild from theirs next time
            return RoundResult(drafter, "conflict", None, latest, len(delivery), delivery.dead, time.perf_counter() - t0)
        failpoint("before_ack", drafter)
        reader.ack(delivery.ids)  # only now: the version that learned from them is durable
        self.learners[drafter] = (manifest.version, learner, self.learners[drafter][2])
        seconds = time.perf_counter() - t0
        now = time.time()
        # lag_seconds: how long the round's oldest record waited from its request's end to this
        # version (how far learning trails serving; a backlog grows it)
        metrics.update({"version": manifest.version, "parent": latest, "seconds": seconds,
                        "generated_tokens": sum(r.generated for r in delivery.records), "time": now,
                        "lag_seconds": max(0.0, now - min(r.created for r in delivery.records))})
        payload = json.dumps(metrics)
        pipe = self.redis.pipeline()
        pipe.xadd(keys.learner_metrics_stream(drafter), {"m": payload}, maxlen=10_000, approximate=True)
        pipe.hset(keys.learner_latest(drafter), mapping={"metrics": payload})
        pipe.execute()
        return RoundResult(drafter, "published", manifest.version, latest, len(delivery), delivery.dead, seconds, metrics)


class PoolUpdater:
    """Scores every drafter of a target on every new record and moves the pool's Hedge weights.

    The weights, the chosen drafter and the Hedge state live in the hash ``pool_key(target)``;
    serving processes read ``serving`` from it to pick the drafter for the next requests."""

    def __init__(self, redis_client, registry: Registry, target: str, consumer: str, round_records: int = 16,
                 eta: float = 4.0, min_idle_ms: int = 60_000, discount: float = 1.0):
        self.redis, self.registry, self.target = redis_client, registry, target
        self.consumer, self.round_records, self.eta, self.min_idle_ms = consumer, round_records, eta, min_idle_ms
        self.discount = discount
        self.models: dict[str, tuple[int, object]] = {}

    def _model(self, drafter: str):
        latest = self.registry.latest(drafter)
        cached = self.models.get(drafter)
        if cached is None or cached[0] != latest:
            try:
                model = self.registry.load_model(drafter, latest)[0]
            except CheckpointError:  # lost or damaged: score what still loads
                latest = self.registry.recover(drafter)
                model = self.registry.load_model(drafter, latest)[0]
            self.models[drafter] = (latest, model)
        return self.models[drafter][1]

    def run_round(self) -> RoundResult:
        from onlinespec.learn.hedge import Hedge
        from onlinespec.learn.pool import DrafterPool

        t0 = time.perf_counter()
        drafters = sorted(d.decode() for d in self.redis.smembers(keys.drafters_set(self.target)))
        if len(drafters) < 2:
            return RoundResult(POOL, "idle")
        reader = FeedbackReader(self.redis, self.target, POOL, self.consumer, self.min_idle_ms)
        delivery = reader.read(self.round_records)
        if not delivery.records:
            return RoundResult(POOL, "idle", dead=delivery.dead)
        raw, consumed = self.redis.hmget(keys.pool_key(self.target), ["state", "consumed"])
        last_round = set(json.loads(consumed)) if consumed else set()  # in case it died before acknowledging
        done = {i for i in delivery.ids if i.decode() in last_round}
        if done:
            reader.ack(sorted(done))
            delivery = delivery.without(done)
            if not delivery.records:
                return RoundResult(POOL, "skipped", records=0, dead=delivery.dead)
        state = json.loads(raw) if raw else None
        same = bool(state) and state["drafters"] == drafters
        hedge = Hedge.from_state(state["hedge"]) if same else None
        if hedge is not None:  # the configured rates apply to the kept losses
            hedge.eta, hedge.discount = self.eta, self.discount
        pool = DrafterPool(drafters, eta=self.eta, hedge=hedge, discount=self.discount,
                           groups=state.get("groups") if same else None)
        records, features = delivery.records, None
        specs = [self.registry.spec(d) for d in drafters]
        if any(map(needs_features, specs)):  # a feature drafter is scored on the captured share only
            hidden = next(s for s in specs if needs_features(s)).get("arch", {}).get("hidden_size")
            records, features, _ = captured_features(self.redis, self.target, records, hidden)
        result = pool.round({d: self._model(d) for d in drafters}, records, features=features) if records else None
        if result is None:  # none of them could score every drafter: nothing to weigh
            reader.ack(delivery.ids)
            return RoundResult(POOL, "skipped", records=len(delivery), dead=delivery.dead)
        self.redis.hset(keys.pool_key(self.target), mapping={
            "state": json.dumps({"drafters": drafters, "hedge": pool.hedge.state(), "groups": pool.group_state()}),
            "weights": json.dumps(dict(zip(drafters, result.weights))),
            "group_weights": json.dumps(result.group_weights),
            "losses": json.dumps(dict(zip(drafters, result.losses))),
            "serving": result.serving,
            "consumed": json.dumps([i.decode() for i in delivery.ids]),  # with the weights, atomically
        })
        reader.ack(delivery.ids)
        return RoundResult(POOL, "published", records=len(delivery), dead=delivery.dead,
                           seconds=time.perf_counter() - t0, metrics=result.to_dict())
