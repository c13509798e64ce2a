"""Enqueues update jobs: when enough new feedback is pending, or on a period when some is.

Every worker process may run a trigger; the in-flight mark (SET NX with expiry, set by
:meth:`onlinespec.learn.control.Control.enqueue_round`) keeps at most one update job per drafter
queued or running, whichever trigger saw the backlog first. The mark
lives ``queue_ttl`` seconds while the job waits in the queue, then the running job's heartbeat
keeps it (``workers.jobs``) and clears it when the round ends, however it ends. A drafter whose
last round failed waits out its backoff key; the next round retries the same pending records.
"""

from __future__ import annotations

import logging
import time

from rq import Queue

from onlinespec.feedback import keys
from onlinespec.background import Background
from onlinespec.learn.control import POOL, Control
from onlinespec.feedback.stream import FeedbackReader

__all__ = ["Trigger"]

log = logging.getLogger(__name__)


class Trigger:
    def __init__(self, redis_client, queue: Queue, target: str, min_records: int = 16, period: float = 10.0,
                 job_timeout: int = 600, queue_ttl: int = 600, poll: float = 0.5):
        self.redis, self.queue, self.target = redis_client, queue, target
        self.min_records, self.period, self.poll = min_records, period, poll
        self.control = Control(redis_client, target=target, job_timeout=job_timeout, queue_ttl=queue_ttl, queue=queue)
        self.last_enqueued: dict[str, float] = {}
        self.task = Background("update-trigger", self.check, period=poll, log=log)  # Redis hiccups: logged, retried

    def drafters(self) -> list[str]:
        return sorted(d.decode() for d in self.redis.smembers(keys.drafters_set(self.target)))

    def check(self) -> list[str]:
        """One pass over the drafters; returns those for which a job was enqueued."""
        enqueued = []
        drafters = self.drafters()
        for drafter in drafters + ([POOL] if len(drafters) >= 2 else []):
            if not self.control.may_learn(drafter):
                continue  # paused, or waiting out the backoff after a failed round
            reader = FeedbackReader(self.redis, self.target, drafter, consumer="trigger")
            pending = reader.pending_new(limit=self.min_records)
            due = time.time() - self.last_enqueued.get(drafter, 0.0) >= self.period
            if pending >= self.min_records or (pending > 0 and due):
                if self.enqueue(drafter):
                    enqueued.append(drafter)
        return enqueued

    def enqueue(self, drafter: str, force: bool = False) -> bool:
        if self.control.enqueue_round(drafter, force=force) is None:
            return False
        self.last_enqueued[drafter] = time.time()
        return True

    def start(self) -> None:
        self.task.start()

    def stop(self) -> None:
        self.task.stop()
