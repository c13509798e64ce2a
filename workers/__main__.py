"""``python -m workers`` (or ``onlinespec worker``): an RQ worker for drafter updates.

One process, torch imported once, models kept between jobs (``SimpleWorker``: no fork per
job), thread counts set explicitly, JSON serializer, a trigger thread, and RQ's warm shutdown
on SIGINT/SIGTERM (the current round finishes; an interrupted round publishes nothing). When
Redis goes away the worker waits for it and reconnects (backoff up to 30 s) instead of exiting.
"""

from __future__ import annotations

import argparse
import logging
import os
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="onlinespec worker", description=__doc__)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    ap.add_argument("--registry", default=os.environ.get("ONLINESPEC_REGISTRY", "registry"))
    ap.add_argument("--target", default=os.environ.get("ONLINESPEC_TARGET_ID", "demo-target"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ONLINESPEC_WORKER_THREADS", "1")))
    ap.add_argument("--round-records", type=int, default=int(os.environ.get("ONLINESPEC_ROUND_RECORDS", "16")))
    ap.add_argument("--period", type=float, default=float(os.environ.get("ONLINESPEC_UPDATE_PERIOD", "10")))
    ap.add_argument("--learner-config", default=os.environ.get("ONLINESPEC_LEARNER_CONFIG"),
                    help="YAML of LearnerConfig defaults (configs/learner.yaml); live config in Redis wins")
    ap.add_argument("--no-trigger", action="store_true", help="only run jobs; another process enqueues them")
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    ap.add_argument("--nice", type=int, default=int(os.environ.get("ONLINESPEC_WORKER_NICE", "10")),
                    help="CPU priority below the server's (os.nice increment; 0: the same): learning takes "
                         "what serving leaves, so it never slows the requests on a shared machine")
    ap.add_argument("--log-level", default=os.environ.get("ONLINESPEC_WORKER_LOG_LEVEL", "INFO"),
                    help="INFO logs every job (RQ's lines too); WARNING only problems")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    if args.nice > 0:
        os.nice(args.nice)

    import torch  # once per process, before any job

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from onlinespec import keys
    from onlinespec.redis_server import connect
    from workers import jobs
    from workers.trigger import Trigger

    jobs.configure(redis_url=args.redis_url, registry_root=args.registry, round_records=args.round_records,
                   learner_config=args.learner_config)
    client = connect(args.redis_url)
    queue = Queue(keys.UPDATE_QUEUE, connection=client, serializer=JSONSerializer)
    tuning = Queue(keys.TUNE_QUEUE, connection=client, serializer=JSONSerializer)  # `onlinespec tune run --workers`
    trigger = None
    if not args.no_trigger:
        trigger = Trigger(client, queue, args.target, min_records=args.round_records, period=args.period)
        trigger.start()
    import redis

    log = logging.getLogger("onlinespec.worker")
    backoff = 1.0
    try:
        while True:
            try:
                worker = SimpleWorker([queue, tuning], connection=client, serializer=JSONSerializer)
                worker.work(burst=args.burst, logging_level=args.log_level)
                return  # burst done, or a warm shutdown (SIGTERM / SIGINT)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unreachable (%s); reconnecting in %.0fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
    finally:
        if trigger:
            trigger.stop()


if __name__ == "__main__":
    main()
