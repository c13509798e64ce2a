"""The control plane of a drafter: its state and every transition made on it, in one place.

The admin API (``serving/admin.py``), the workers' trigger (``workers/trigger.py``), the
server's rollback guard (``serving/hotswap.py``) and the CLI (``onlinespec drafter ...``) all go
through :class:`Control`; none of them writes these keys itself.

    state            latest version, paused, pinned version, backoff, the round in flight
    pause            learning stops; the latest version goes on serving
    resume           learning goes on; a pin is lifted
    pin V            the latest pointer goes to V (verified first), learning stops, V is never collected
    rollback V       the latest pointer goes to V (verified first); the learners continue from it
    judge            the rollback guard: a version whose own drafts, summed over every serving
                     replica, accept less than its parent's by more than a margin is rolled back
                     (compare-and-set: one decision per drafter, whichever replica makes it)
    enqueue_round    one learning round queued; at most one queued or running per drafter (an
                     in-flight mark, SET NX with expiry, that the running job's heartbeat keeps)

Learning runs only when the drafter is neither paused nor waiting out the backoff a failed
round set (:meth:`Control.may_learn`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from onlinespec.feedback import keys

__all__ = ["Control", "DrafterState", "POOL"]

log = logging.getLogger(__name__)
ACCEPTANCE_TTL = 7 * 86_400  # seconds a version's summed acceptance is kept after its last draft

POOL = "__pool__"  # the drafter pool's pseudo-drafter: its rounds update the Hedge weights over drafters


@dataclass(frozen=True)
class DrafterState:
    drafter: str
    latest: int | None
    paused: bool
    pinned: int | None
    backoff: bool
    inflight: str | None  # the queued or running round's job id

    @property
    def learning(self) -> bool:
        return not self.paused and not self.backoff

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "learning": self.learning}


class Control:
    def __init__(self, redis, registry=None, target: str | None = None, job_timeout: int = 600, queue_ttl: int = 600,
                 queue=None):
        self.redis, self.registry, self.target = redis, registry, target
        self.job_timeout, self.queue_ttl = job_timeout, queue_ttl
        self._queue = queue  # the RQ queue of learning rounds (default: made on first use)

    # ------------------------------------------------------------------ state

    def state(self, drafter: str) -> DrafterState:
        paused, pinned, backoff, inflight, latest = self.redis.mget(
            keys.paused_key(drafter), keys.pinned_key(drafter), keys.backoff_key(drafter), keys.inflight_key(drafter),
            keys.latest_key(drafter))
        return DrafterState(drafter=drafter, latest=int(latest) if latest is not None else None,
                            paused=paused is not None, pinned=int(pinned) if pinned is not None else None,
                            backoff=backoff is not None, inflight=inflight.decode() if inflight else None)

    def may_learn(self, drafter: str) -> bool:
        """Neither paused nor waiting out a failed round's backoff."""
        return not self.redis.exists(keys.paused_key(drafter), keys.backoff_key(drafter))

    def paused(self, drafter: str) -> bool:
        return bool(self.redis.exists(keys.paused_key(drafter)))

    # ------------------------------------------------------------------ transitions

    def pause(self, drafter: str) -> DrafterState:
        self.redis.set(keys.paused_key(drafter), "1")
        return self.state(drafter)

    def resume(self, drafter: str) -> DrafterState:
        self.redis.delete(keys.paused_key(drafter), keys.pinned_key(drafter))
        return self.state(drafter)

    def rollback(self, drafter: str, version: int, reason: str = "", expect: int | None = None) -> DrafterState:
        """Point the drafter back at a kept version (verified first: a version that does not load
        is refused with ``CheckpointError``; ``expect``: only if the latest is still that one,
        else ``PublishConflict``)."""
        self._registry().rollback(drafter, version, reason=reason, expect=expect)
        return self.state(drafter)

    def pin(self, drafter: str, version: int, reason: str = "pinned") -> DrafterState:
        self._registry().rollback(drafter, version, reason=reason)
        pipe = self.redis.pipeline()
        pipe.set(keys.paused_key(drafter), "pinned")
        pipe.set(keys.pinned_key(drafter), version)  # never collected while pinned
        pipe.execute()
        return self.state(drafter)

    def enqueue_round(self, drafter: str, force: bool = False) -> str | None:
        """Queue one learning round (the pool's for :data:`POOL`); its job id, or None when one is
        already queued or running (unless ``force``)."""
        if self.target is None:
            raise ValueError("enqueue_round needs the target whose feedback the round reads")
        job_id = f"update-{drafter.strip('_')}-{uuid.uuid4().hex[:8]}"
        if not self.redis.set(keys.inflight_key(drafter), job_id, nx=True, ex=self.queue_ttl) and not force:
            return None
        func, args = ("workers.jobs.update_pool", (self.target,)) if drafter == POOL else (
            "workers.jobs.update_drafter", (self.target, drafter))
        self.queue().enqueue_call(func, args=args, timeout=self.job_timeout, job_id=job_id, result_ttl=600,
                                  failure_ttl=86_400)
        return job_id

    # ------------------------------------------------------------------ the rollback guard

    def record_acceptance(self, counts: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Add a replica's own-draft counts, ``{(drafter, version): (drafted, accepted)}``."""
        if not counts:
            return
        pipe = self.redis.pipeline(transaction=False)
        for (drafter, version), (drafted, accepted) in counts.items():
            key = keys.acceptance_key(drafter, version)
            pipe.hincrby(key, "drafted", int(drafted))
            pipe.hincrby(key, "accepted", int(accepted))
            pipe.expire(key, ACCEPTANCE_TTL)
        pipe.execute()

    def acceptance(self, drafter: str, version: int) -> tuple[int, int]:
        """(drafted, accepted) of a version's own drafts over every replica."""
        drafted, accepted = self.redis.hmget(keys.acceptance_key(drafter, version), "drafted", "accepted")
        return int(drafted or 0), int(accepted or 0)

    def judge(self, drafter: str, version: int, parent: int, min_drafted: int, margin: float) -> str | None:
        """Roll ``version`` back to ``parent`` when, with at least ``min_drafted`` drafts each, it
        accepts less than the parent by more than ``margin``, and only while it is still the
        latest; the reason when this call rolled it back, else None."""
        drafted, accepted = self.acceptance(drafter, version)
        before_drafted, before_accepted = self.acceptance(drafter, parent)
        if drafted < min_drafted or before_drafted < min_drafted:
            return None
        now, before = accepted / drafted, before_accepted / before_drafted
        if now >= before - margin:
            return None
        reason = f"acceptance {now:.3f} < parent v{parent} {before:.3f} - {margin} (over {drafted} drafts)"
        from onlinespec.learn.registry import CheckpointError, PublishConflict

        try:  # never over a newer version, nor twice: another replica may have decided already
            self.rollback(drafter, parent, reason=reason, expect=version)
        except PublishConflict:
            return None
        except CheckpointError as exc:
            log.warning("rollback of %s v%s to v%s refused: %s", drafter, version, parent, exc)
            return None
        return reason

    # ------------------------------------------------------------------ parts

    def queue(self):
        if self._queue is None:
            from rq import Queue
            from rq.serializers import JSONSerializer

            self._queue = Queue(keys.UPDATE_QUEUE, connection=self.redis, serializer=JSONSerializer)
        return self._queue

    def _registry(self):
        if self.registry is None:
            raise ValueError("rollback and pin need the registry (to verify the version first)")
        return self.registry
