"""Admin API behind a bearer token: drafters and versions, pin and rollback, learning control.

Without a configured token every admin route answers 403: the API is off, not open.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel

from onlinespec.feedback import keys
from onlinespec.learn.control import Control
from onlinespec.learn.learner import LearnerConfig
from onlinespec.learn.registry import CheckpointError, PublishConflict, Registry
from onlinespec.learn.round import learner_config, learner_health
from serving.auth import bearer_token, secret_in

__all__ = ["admin_router", "drafter_overview"]


class VersionBody(BaseModel):
    version: int


def drafter_overview(redis, registry: Registry, drafter: str, serving_version: int | None) -> dict:
    state = Control(redis, registry).state(drafter)
    versions = []
    for v in registry.versions(drafter):
        try:
            m = registry.manifest(drafter, v)
        except CheckpointError:
            continue
        versions.append({"version": v, "parent": m.parent, "created": m.created, "note": m.note,
                         "param_change_norm": m.metrics.get("param_change_norm"),
                         "served_loss": m.metrics.get("served_loss"), "records": m.metrics.get("records"),
                         # what the learners measured of it without drafting (learn/estimate.py)
                         "estimated_acceptance": (m.metrics.get("acceptance_estimate") or {}).get("all", {}
                                                                                                  ).get("acceptance")})
    return {
        "id": drafter,
        "serving_version": serving_version,
        "latest": registry.latest(drafter),
        "paused": state.paused,
        "pinned": state.pinned is not None,
        "backoff": state.backoff,
        "health": learner_health(redis, drafter),
        "learner": learner_config(redis, drafter).to_dict(),
        "versions": versions,
    }


def admin_router(token: str | None, redis, registry: Registry, drafters: dict, target: str) -> APIRouter:
    def check(authorization: str | None = Header(default=None)):
        if not token:
            raise HTTPException(403, "the admin API is disabled: set ONLINESPEC_ADMIN_TOKEN (or serving.admin_token)")
        if not secret_in(bearer_token(authorization), (token,)):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    router = APIRouter(prefix="/admin", dependencies=[Depends(check)])

    def known(drafter: str) -> str:
        if drafter not in drafters:
            raise HTTPException(404, f"unknown drafter {drafter!r}; known: {sorted(drafters)}")
        return drafter

    @router.get("/drafters")
    def list_drafters():
        return {"drafters": [drafter_overview(redis, registry, d, h.version) for d, h in drafters.items()]}

    control = Control(redis, registry, target)

    def move(drafter: str, version: int, pin: bool):
        """Roll back or pin to a kept version: 400 when it does not load, 409 when the latest moved."""
        try:
            if pin:
                control.pin(known(drafter), version, reason="admin pin")
            else:
                control.rollback(known(drafter), version, reason="admin")
        except CheckpointError as exc:
            raise HTTPException(400, f"cannot {'pin' if pin else 'roll back to'} v{version}: {exc}") from None
        except PublishConflict as exc:
            raise HTTPException(409, str(exc)) from None

    @router.post("/drafters/{drafter}/rollback")
    def rollback(drafter: str, body: VersionBody):
        move(drafter, body.version, pin=False)
        return {"drafter": drafter, "latest": body.version}

    @router.post("/drafters/{drafter}/pin")
    def pin(drafter: str, body: VersionBody):
        """Serve this version and stop learning until resumed."""
        move(drafter, body.version, pin=True)
        return {"drafter": drafter, "latest": body.version, "paused": True}

    @router.post("/drafters/{drafter}/pause")
    def pause(drafter: str):
        return {"drafter": drafter, "paused": control.pause(known(drafter)).paused}

    @router.post("/drafters/{drafter}/resume")
    def resume(drafter: str):
        return {"drafter": drafter, "paused": control.resume(known(drafter)).paused}

    @router.get("/drafters/{drafter}/learner")
    def get_learner(drafter: str):
        return learner_config(redis, known(drafter)).to_dict()

    @router.put("/drafters/{drafter}/learner")
    def set_learner(drafter: str, body: dict):
        """Replace or patch the learner hyperparameters (nested keys merge); applied next round."""
        current = learner_config(redis, known(drafter)).to_dict()
        merged = {**current, **{k: v for k, v in body.items() if not isinstance(v, dict)}}
        for section in ("loss", "optim"):
            if isinstance(body.get(section), dict):
                merged[section] = {**current[section], **body[section]}
        try:
            config = LearnerConfig.from_dict(merged)
        except (ValueError, TypeError) as exc:
            raise HTTPException(400, f"invalid learner settings: {exc}") from None
        redis.set(keys.learner_config(drafter), json.dumps(config.to_dict()))
        return config.to_dict()

    @router.post("/drafters/{drafter}/update")
    def trigger_update(drafter: str):
        job = control.enqueue_round(known(drafter))
        if job is None:
            raise HTTPException(409, f"an update of {drafter} is already queued or running")
        return {"drafter": drafter, "enqueued": True, "job": job}

    return router
