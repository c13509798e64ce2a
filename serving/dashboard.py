"""The live dashboard: ``/dashboard`` (one HTML file, no CDN) and ``/dashboard/data`` (JSON).

What anyone who reaches the port may read: model-level aggregates (accepted length of each
drafter's own drafts per version and of suffix copies, pool weights and drafter routing, traffic
per declared domain, queue and learner lag, versions with their round losses and estimated
acceptance, event types). What needs the admin bearer token: learner hyperparameters, the
reasons of events (paths, error texts), and traffic per API key (hashed). Nothing per user is
shown at all.

A sampler thread records, every ``period`` seconds, the mean accepted length since the previous
sample of each drafter version's own drafts and of suffix copies (from the engine's counters),
the pool's weights, and the queue and worker lag, so the charts have history even when nobody
is looking.

``/dashboard/studies`` lists the tuning studies (``onlinespec tune``) under ``ONLINESPEC_STUDIES``
(default ``.onlinespec/studies``, relative to the server's directory) with their plots.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from onlinespec.feedback import keys
from onlinespec.background import Background
from onlinespec.learn.control import Control

__all__ = ["dashboard_router"]

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"


def _studies_root() -> Path:
    from onlinespec.learn.tune.cli import STUDIES

    return Path(os.environ.get("ONLINESPEC_STUDIES") or STUDIES)


class Sampler:
    def __init__(self, state, redis, target: str, drafters: dict, period: float = 2.0, keep: int = 900):
        self.state, self.redis, self.target, self.drafters = state, redis, target, drafters
        self.period = period
        # {t, drafter, version, source (own | copied), mean_accepted_length, drafts}
        self.accept = deque(maxlen=keep)
        self.pool = deque(maxlen=keep)  # {t, weights}
        self.lag = deque(maxlen=keep)  # {t, queue_depth, feedback_pending, update_jobs}
        self.last: dict = {}
        self._updates = Control(redis).queue() if redis is not None else None  # RQ's public count, not its keys
        # a dashboard must never hurt serving: errors are logged and counted, the task goes on
        self.task = Background("dashboard-sampler", self.sample, period=period)

    def start(self) -> Sampler:
        self.task.start()
        return self

    def stop(self) -> None:
        self.task.stop()

    def sample(self) -> None:
        now = time.time()
        m = self.state.metrics
        for key, blocks in list(m.own_blocks.values.items()):  # each drafter version's own drafts
            labels = dict(key)
            self._accept(now, ("own", key), blocks, m.own_accepted_tokens.values.get(key, 0.0),
                         labels["drafter"], labels["version"], "own")
        self._accept(now, ("copied",), sum(m.copy_blocks.values.values()),  # suffix copies, whoever's row
                     sum(m.copied_accepted_tokens.values.values()), "suffix copies", None, "copied")
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
            lag["update_jobs"] = self._updates.count
        self.lag.append(lag)

    def _accept(self, now, key, blocks: float, accepted: float, drafter, version, source: str) -> None:
        prev_b, prev_a = self.last.get(key, (0.0, 0.0))
        if blocks > prev_b:
            self.accept.append({"t": now, "drafter": drafter, "version": version, "source": source,
                                "mean_accepted_length": 1 + (accepted - prev_a) / (blocks - prev_b),
                                "drafts": blocks - prev_b})
        self.last[key] = (blocks, accepted)


def dashboard_router(state, redis, registry, drafters: dict, target: str, period: float = 2.0,
                     admin_token: str | None = None) -> APIRouter:
    router = APIRouter()
    sampler = Sampler(state, redis, target, drafters, period).start()
    state.extra["sampler"] = sampler  # stopped by the server's cleanup

    @router.get("/dashboard", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @router.get("/dashboard/studies")
    def tuning_studies():
        """The tuning studies in ONLINESPEC_STUDIES (default .onlinespec/studies): progress,
        best against the baseline, held-out verdict (onlinespec tune)."""
        from onlinespec.learn.tune.study import studies

        out = []
        for study in studies(_studies_root())[:10]:
            try:
                out.append(study.summary())
            except Exception as exc:  # noqa: BLE001 - a study being written or damaged: listed, not fatal
                out.append({"name": study.name, "error": f"{type(exc).__name__}: {exc}"})
        return {"root": str(_studies_root()), "studies": out}

    @router.get("/dashboard/studies/{name}/{plot}.png")
    def study_plot(name: str, plot: str):
        if plot not in ("history", "params") or not name or "/" in name or name.startswith("."):
            raise HTTPException(404, "no such plot")
        path = _studies_root() / name / f"{plot}.png"
        if not path.is_file():
            raise HTTPException(404, f"no {plot}.png in study {name} yet (onlinespec tune show {name} draws it)")
        return FileResponse(path, media_type="image/png")

    @router.get("/dashboard/data")
    def data(authorization: str | None = Header(default=None)):
        from serving.admin import drafter_overview
        from serving.auth import bearer_token, secret_in

        admin = bool(admin_token) and secret_in(bearer_token(authorization), (admin_token,))

        loop = state.loop
        router = loop.router
        out = {"target": target, "time": time.time(), "accepted_length": list(sampler.accept),
               "pool_weights": list(sampler.pool), "lag": list(sampler.lag), "drafters": [], "rounds": {},
               "events": [],
               # the chance of each drafter for a request (of a group without weights of its own)
               "routing": router.probabilities() if router is not None else (
                   {loop.default_drafter.drafter_id: 1.0} if loop.default_drafter else {}),
               # requests per traffic group: declared domains for anyone, API keys (hashed) for the admin
               "traffic": [{"group": g, "requests": n,
                            "routing": router.probabilities(g) if router is not None and g != "all" else None}
                           for g, n in sorted(loop.traffic.items(), key=lambda x: -x[1])
                           if admin or not g.startswith("key:")][:20]}
        prefix = getattr(getattr(loop, "batch", None), "prefix", None)  # the embedded engine's
        if prefix is not None:
            st = prefix.stats
            out["prefix_cache"] = {"tokens": st.tokens, "bytes": st.nbytes, "looked_up": st.looked_up, "hit": st.hit,
                                   "hit_share": st.hit / st.looked_up if st.looked_up else None}
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
            if watcher is not None:  # why the serving version is not the latest
                overview["status"] = watcher.status(did, overview["latest"], overview["paused"], overview["pinned"])
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
