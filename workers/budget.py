"""A learning budget: the share of one core a worker's jobs may take, on average.

On a machine where the server and the learners share cores, every CPU second the worker takes
slows the server's forwards, whatever its nice level (on 2 cores the speculating server's plain
decoding steps ran about a fifth slower than a server without a learner beside it:
docs/adaptation.md). ``workers.budget`` trades how fast the drafters learn against that: after
each job the worker rests until the job's CPU time is at most ``budget`` of the wall time since
it began. 1.0 (the default) never rests; the queue simply waits while it does (the in-flight
mark keeps one round per drafter queued). A round still learns ``round_records`` records, so a
budget below what the traffic needs leaves a backlog that grows: records wait longer before
they teach, and a feature drafter's captured features expire after ``serving.features_ttl``
(a record without them teaches it nothing). Measured on 2 cores (docs/adaptation.md, stop 40):
at 0.5 the server served 9% more tokens/s than at 1.0 and the drafter learned about a quarter
as many versions.
"""

from __future__ import annotations

import time

from rq import SimpleWorker

__all__ = ["rest_seconds", "BudgetedWorker"]


def rest_seconds(cpu_seconds: float, wall_seconds: float, budget: float) -> float:
    """How long to rest after a job that took ``cpu_seconds`` of CPU in ``wall_seconds``, so that
    it took at most ``budget`` of one core over the job and the rest together."""
    if budget >= 1.0 or cpu_seconds <= 0.0:
        return 0.0
    return max(0.0, cpu_seconds / budget - wall_seconds)


class BudgetedWorker(SimpleWorker):
    """An RQ worker (no fork per job) that rests after each job as :func:`rest_seconds` says. A
    warm shutdown (SIGTERM / SIGINT) ends the rest at once, and takes at most a second beyond
    the job it waits for (:meth:`subscribe`)."""

    budget: float = 1.0
    poll: float = 0.25  # how often a rest looks for a shutdown request

    def execute_job(self, job, queue):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return super().execute_job(job, queue)
        finally:
            self.rest(rest_seconds(time.process_time() - cpu, time.perf_counter() - wall, self.budget))

    def subscribe(self):
        """RQ's own, with its command listener waking every second instead of every minute.

        RQ's shutdown unsubscribes and stops the listener thread; since redis-py 8 the stop
        waits for the thread, which sleeps in a read of up to ``sleep_time`` (RQ passes 60 s)
        whenever it was already back in one, so one warm shutdown in a few took a minute."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                                       exception_handler=getattr(self, "_pubsub_exception_handler", None))

    def rest(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while not self._stop_requested and (left := end - time.perf_counter()) > 0:
            time.sleep(min(self.poll, left))
