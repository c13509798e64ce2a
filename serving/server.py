"""Assembling a server: models, engine, loop, optional Redis feedback and hot swap, uvicorn."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import uvicorn

from onlinespec.decode.engine import SpeculativeEngine
from serving.app import ServerState, create_app
from serving.engine_loop import EngineLoop
from serving.metrics import Counter, Gauge, Metrics

__all__ = ["build_state", "BackgroundServer"]


def _prefix_metrics(metrics: Metrics, loop: EngineLoop) -> None:
    """The prefix cache's figures (:class:`onlinespec.decode.prefix.PrefixStats`) of the loop's
    batch (a new batch after a crash starts an empty cache, its counters going on)."""
    def stat(name: str):
        prefix = loop.batch.prefix
        return {(): getattr(prefix.stats, name) if prefix is not None else 0}
    for kind, name, field, text in (
            (Counter, "prefix_cache_lookup_tokens_total", "looked_up", "Prompt tokens looked up in the prefix cache."),
            (Counter, "prefix_cache_hit_tokens_total", "hit",
             "Prompt tokens whose keys and values came from the prefix cache (not prefilled)."),
            (Counter, "prefix_cache_evicted_tokens_total", "evicted", "Tokens evicted from the prefix cache."),
            (Gauge, "prefix_cache_tokens", "tokens", "Positions the prefix cache holds (serving.prefix_cache_tokens)."),
            (Gauge, "prefix_cache_bytes", "nbytes", "Memory the prefix cache's keys, values and features take.")):
        metrics.sample(kind(name, text), lambda field=field: stat(field))


def build_state(engine: SpeculativeEngine | None, tokenizer, model_name: str, writer=None, watcher=None, redis=None,
                max_active: int = 8, max_queue: int = 64, prefill_tokens: int = 256, kv_cache_tokens: int | None = None,
                prefix_cache_tokens: int = 0, prefix_cache_scope: str = "shared", max_prompt_tokens: int = 1536,
                max_tokens: int = 512, drafters: dict | None = None, api_keys=(), router=None,
                make_loop=None, max_request_bytes: int = 8 << 20,
                max_requests_per_tenant: int | None = None) -> ServerState:
    """``make_loop(metrics)``: another engine loop than the embedded engine's (``serving.engine: vllm``,
    :class:`serving.vllm_loop.VllmLoop`); ``engine`` is then None."""
    metrics = Metrics()
    if writer is not None:
        metrics.sample(Gauge("feedback_queue_depth", "Feedback records waiting to be written."),
                       lambda: {(): writer.depth})
        metrics.sample(Gauge("feedback_buffered", "Feedback records encoded and waiting for Redis."),
                       lambda: {(): len(writer.buffer)})
        metrics.sample(Counter("feedback_write_failures_total", "Feedback writes that failed and were retried."),
                       lambda: {(): writer.stats.failed_writes})
        metrics.sample(Counter("feedback_dropped_total",
                               "Feedback records lost (queue full; Redis away until the buffer overflowed; unencodable)."),
                       lambda: {(("reason", "queue_full"),): writer.stats.dropped_full,
                                (("reason", "unreachable"),): writer.stats.dropped_unreachable,
                                (("reason", "unencodable"),): writer.stats.dropped_unencodable})
        metrics.sample(Counter("feedback_written_total", "Feedback records written to Redis."),
                       lambda: {(): writer.stats.written})
        metrics.sample(Counter("feedback_features_written_total",
                               "Captured requests whose target features were written beside their record."),
                       lambda: {(): writer.stats.features_written})
        metrics.sample(Counter("feedback_features_bytes_total",
                               "Bytes of captured target features written (each kept serving.features_ttl seconds)."),
                       lambda: {(): writer.stats.features_bytes})
    if watcher is not None:
        metrics.sample(Counter("drafter_refusals_total", "Versions refused by validation."),
                       lambda: {(): watcher.stats.refusals})
        metrics.sample(Counter("drafter_rollbacks_total", "Versions rolled back after a regression."),
                       lambda: {(): watcher.stats.rollbacks})
    if redis is not None and drafters:
        _learner_metrics(metrics, redis, [*drafters, *(["__pool__"] if len(drafters) > 1 else [])],
                         engine.config.target_id if engine is not None else model_name)
    if router is not None:
        metrics.sample(Gauge("drafter_route_probability",
                             "Chance that a request (of no group with its own weights) drafts with each drafter."),
                       lambda: {(("drafter", d),): p for d, p in router.probabilities().items()})
    if engine is not None and engine.suffix is not None:
        cache = engine.suffix
        metrics.sample(Gauge("suffix_cache_tokens", "Output tokens suffix speculation can copy from."),
                       lambda: {(): cache.tokens})
        metrics.sample(Gauge("suffix_cache_entries", "n-grams indexed by suffix speculation."),
                       lambda: {(): len(cache)})
    from onlinespec.background import tasks

    metrics.sample(Counter("background_errors_total", "Errors in background tasks (each logged; the task goes on)."),
                   lambda: {(("task", t.name),): t.errors for t in tasks()})
    metrics.sample(Gauge("background_alive", "Background tasks running (1) or stopped (0)."),
                   lambda: {(("task", t.name),): int(t.alive) for t in tasks()})
    if make_loop is not None:
        loop = make_loop(metrics).start()
    else:
        loop = EngineLoop(engine, metrics, writer, watcher, max_active=max_active, max_queue=max_queue,
                          drafters=drafters, prefill_tokens=prefill_tokens, kv_cache_tokens=kv_cache_tokens,
                          prefix_cache_tokens=prefix_cache_tokens, prefix_cache_scope=prefix_cache_scope,
                          router=router).start()
        _prefix_metrics(metrics, loop)
    return ServerState(loop=loop, tokenizer=tokenizer, model_name=model_name, metrics=metrics, redis=redis,
                       max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, api_keys=tuple(api_keys),
                       context=engine.max_context() if engine is not None else None,
                       max_request_bytes=max_request_bytes, max_requests_per_tenant=max_requests_per_tenant)


def _learner_metrics(metrics: Metrics, redis, drafters: list[str], target: str) -> None:
    """Learning faults, read from Redis at each scrape (the last values while Redis is away)."""
    from onlinespec.feedback import keys

    last: dict = {"t": 0.0}

    def read() -> dict:
        """One Redis round trip per scrape (the metrics below share it), whatever their order."""
        if time.monotonic() - last["t"] < 1.0:
            return last
        last["t"] = time.monotonic()
        try:
            pipe = redis.pipeline(transaction=False)
            for d in drafters:
                pipe.hmget(keys.health_key(d), ["failed_rounds", "redelivered_skipped", "without_features",
                                                "bad_features"])
                pipe.get(keys.relearned_key(d))
            pipe.get(keys.dead_letter_count(target))
            *rows, dead = pipe.execute()
            health, relearned = rows[0::2], rows[1::2]
            last.update(failed={(("drafter", d),): int(h[0] or 0) for d, h in zip(drafters, health)},
                        skipped={(("drafter", d),): int(h[1] or 0) for d, h in zip(drafters, health)},
                        without_features={(("drafter", d),): int(h[2] or 0) for d, h in zip(drafters, health)},
                        bad_features={(("drafter", d),): int(h[3] or 0) for d, h in zip(drafters, health)},
                        relearned={(("drafter", d),): int(r or 0) for d, r in zip(drafters, relearned)},
                        dead={(): int(dead or 0)})
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is away
            pass
        return last

    metrics.sample(Counter("learner_failed_rounds_total", "Learning rounds that failed (retried after a backoff)."),
                   lambda: read().get("failed", {}))
    metrics.sample(Counter("learner_redelivered_skipped_total",
                           "Redelivered feedback entries acknowledged as already learned (not learned twice)."),
                   lambda: read().get("skipped", {}))
    metrics.sample(Counter("learner_records_without_features_total",
                           "Records a feature drafter could not learn from: no captured features (expired or not captured)."),
                   lambda: read().get("without_features", {}))
    metrics.sample(Counter("learner_bad_features_total",
                           "Captured features skipped as malformed (wrong width, not fitting their record, non-finite)."),
                   lambda: read().get("bad_features", {}))
    metrics.sample(Counter("learner_relearned_entries_total",
                           "Feedback entries learned by a second version (double learning: should stay 0)."),
                   lambda: read().get("relearned", {}))
    metrics.sample(Counter("feedback_dead_letters_total", "Feedback entries put aside (invalid, or failing every round)."),
                   lambda: read().get("dead", {}))


@dataclass
class BackgroundServer:
    """uvicorn in a thread, on loopback: for tests and the embedded mode."""

    state: ServerState
    host: str = "127.0.0.1"
    port: int = 0

    app: object = None  # a prepared app (admin routes added); default: create_app(state)

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        app = self.app or create_app(self.state)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.loop.stop()
