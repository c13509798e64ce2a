"""The live dashboard: ``/dashboard`` (one HTML file, no CDN) and ``/dashboard/data`` (JSON).

What anyone who reaches the port may read: model-level aggregates (accepted length per drafter
version, pool weights, queue and learner lag, versions and round losses, event types). What
needs the admin bearer token: learner hyperparameters and the reasons of events (paths, error
texts). Nothing per tenant is shown at all.

A sampler thread records, every ``period`` seconds, the mean accepted length of each drafter
version since the previous sample (from the engine's counters), the pool's weights, and the
queue and worker lag, so the charts have history even when nobody is looking.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path

from fastapi import APIRouter, Header
from fastapi.responses import HTMLResponse

from onlinespec import keys

__all__ = ["dashboard_router"]

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"


class Sampler:
    def __init__(self, state, redis, target: str, drafters: dict, period: float = 2.0, keep: int = 900):
        self.state, self.redis, self.target, self.drafters = state, redis, target, drafters
        self.period = period
        self.accept = deque(maxlen=keep)  # {t, drafter, version, mean_accepted_length, drafts}
        self.pool = deque(maxlen=keep)  # {t, weights}
        self.lag = deque(maxlen=keep)  # {t, queue_depth, feedback_pending, update_jobs}
        self.last: dict = {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="dashboard-sampler", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a dashboard must never hurt serving
                pass

    def sample(self) -> None:
        now = time.time()
        m = self.state.metrics
        for key, drafts in list(m.num_drafts.values.items()):
            labels = dict(key)
            accepted = m.num_accepted_tokens.values.get(key, 0.0)
            prev_d, prev_a = self.last.get(key, (0.0, 0.0))
            if drafts > prev_d:
                self.accept.append({"t": now, "drafter": labels["drafter"], "version": labels["version"],
                                    "mean_accepted_length": 1 + (accepted - prev_a) / (drafts - prev_d),
                                    "drafts": drafts - prev_d})
            self.last[key] = (drafts, accepted)
        lag = {"t": now, "queue_depth": self.state.loop.depth}
        if self.redis is not None:
            weights = self.redis.hget(keys.pool_key(self.target), "weights")
            if weights:
                self.pool.append({"t": now, "weights": json.loads(weights)})
            pending = {}
            try:
                for g in self.redis.xinfo_groups(keys.feedback_stream(self.target)):
                    name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                    pending[name] = int(g.get("pending", 0)) + int(g.get("lag") or 0)
            except Exception:  # noqa: BLE001 - the stream may not exist yet
                pass
            lag["feedback_pending"] = pending
            lag["update_jobs"] = int(self.redis.llen(f"rq:queue:{keys.UPDATE_QUEUE}"))
        self.lag.append(lag)


def dashboard_router(state, redis, registry, drafters: dict, target: str, period: float = 2.0,
                     admin_token: str | None = None) -> APIRouter:
    router = APIRouter()
    sampler = Sampler(state, redis, target, drafters, period)
    state.extra["sampler"] = sampler

    @router.get("/dashboard", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @router.get("/dashboard/data")
    def data(authorization: str | None = Header(default=None)):
        from serving.admin import drafter_overview
        from serving.app import bearer_token, secret_in

        admin = bool(admin_token) and secret_in(bearer_token(authorization), (admin_token,))

        out = {"target": target, "time": time.time(), "accepted_length": list(sampler.accept),
               "pool_weights": list(sampler.pool), "lag": list(sampler.lag), "drafters": [], "rounds": {},
               "events": [], "serving": state.loop.engine.drafter.drafter_id if state.loop.engine.drafter else None}
        watcher = getattr(state.loop, "watcher", None)
        if watcher is not None:
            out["swaps"] = watcher.stats.swaps
            out["refusals"] = watcher.stats.refusals
            out["rollbacks"] = watcher.stats.rollbacks
        if redis is None:
            return out
        out["admin"] = admin
        for did, handle in drafters.items():
            overview = drafter_overview(redis, registry, did, handle.version)
            if not admin:
                overview.pop("learner")
            out["drafters"].append(overview)
            rounds = redis.xrevrange(keys.learner_metrics_stream(did), count=300)
            out["rounds"][did] = [json.loads(fields[b"m"]) for _, fields in reversed(rounds)]
        for entry_id, fields in redis.xrevrange(keys.events_stream, count=50):
            event = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            if not admin:
                event.pop("reason", None)
            event["t"] = int(entry_id.decode().split("-")[0]) / 1000
            out["events"].append(event)
        return out

    return router
