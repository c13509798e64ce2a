"""Operations routes: liveness (/health), readiness (/ready: the engine loop runs; Redis is
reported, not required) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

__all__ = ["ops_router"]


def ops_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/ready")
    async def ready():
        checks = {"models": True, "engine_loop": state.loop.alive}
        if state.redis is None:
            checks["redis"] = "disabled"
        else:
            try:
                checks["redis"] = bool(await asyncio.to_thread(state.redis.ping))
            except Exception as exc:  # noqa: BLE001
                checks["redis"] = f"unreachable: {exc}"
        # Serving does not need Redis: without it feedback is buffered (then counted as lost) and
        # versions stop changing, so an unreachable Redis degrades the server but keeps it ready.
        ok = bool(checks["engine_loop"])
        body = {"ready": ok, "checks": checks, "degraded": checks["redis"] not in (True, "disabled")}
        if state.loop.restarts:
            body["engine_loop_restarts"] = state.loop.restarts
            body["last_crash"] = state.loop.last_crash
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return router
