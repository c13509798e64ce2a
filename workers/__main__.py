"""``python -m workers`` (or ``onlinespec worker``): an RQ worker for drafter updates.

One process, torch imported once, models kept between jobs (``SimpleWorker``: no fork per
job), thread counts set explicitly, JSON serializer, a trigger thread, and RQ's warm shutdown
on SIGINT/SIGTERM (the current round finishes; an interrupted round publishes nothing). When
Redis goes away the worker waits for it and reconnects (backoff up to 30 s) instead of exiting.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's settings: its flags over the service config (the same file and environment
    overrides the server reads), so server and workers agree on the registry, target and learner."""
    ap = argparse.ArgumentParser(prog="onlinespec worker", description=__doc__)
    ap.add_argument("--config", default=None,
                    help="service YAML (default: ONLINESPEC_CONFIG, else configs/demo.yaml), read as the server "
                         "reads it: target id, Redis, registry, learner defaults and the workers section; the "
                         "flags below override it")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--registry", default=None)
    ap.add_argument("--target", default=None, help="target id whose feedback to learn from")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--round-records", type=int, default=None)
    ap.add_argument("--period", type=float, default=None)
    ap.add_argument("--learner-config", default=None,
                    help="YAML of LearnerConfig defaults (the config's `learner`); live config in Redis wins")
    ap.add_argument("--no-trigger", action="store_true", help="only run jobs; another process enqueues them")
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    ap.add_argument("--nice", type=int, default=None,
                    help="CPU priority below the server's (os.nice increment; 0: the same): learning takes "
                         "what serving leaves, so it never slows the requests on a shared machine")
    ap.add_argument("--budget", type=float, default=None,
                    help="share of one core the jobs may take on average (the config's workers.budget; 1: no "
                         "rest): after each job the worker rests until its CPU time is at most this share of "
                         "the time since the job began")
    ap.add_argument("--log-level", default=os.environ.get("ONLINESPEC_WORKER_LOG_LEVEL", "INFO"),
                    help="INFO logs every job (RQ's lines too); WARNING only problems")
    args = ap.parse_args(argv)
    from onlinespec.config import load_config

    cfg = load_config(args.config)  # flags win over the config, the config's environment overrides over its file
    args.redis_url = args.redis_url or cfg.redis_url
    args.registry = args.registry or cfg.registry
    args.target = args.target or cfg.target_id
    args.threads = args.threads or cfg.workers.threads
    args.round_records = args.round_records or cfg.workers.round_records
    args.period = args.period or cfg.workers.period
    args.learner_config = args.learner_config or cfg.learner
    # drafters with learner settings of their own in the config (where Redis holds none)
    from onlinespec.learn.learner import drafter_learner_configs

    try:  # over --learner-config's file where given
        configs = drafter_learner_configs(cfg, args.learner_config)
    except ValueError as exc:
        ap.error(str(exc))
    args.drafter_configs = {d.id: configs[d.id] for d in cfg.drafters if d.learner}
    args.nice = cfg.workers.nice if args.nice is None else args.nice
    args.budget = cfg.workers.budget if args.budget is None else args.budget
    try:  # the flag is checked as the config's own setting is
        dataclasses.replace(cfg.workers, budget=args.budget)
    except ValueError as exc:
        ap.error(f"--budget: {exc}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    if args.nice > 0:
        os.nice(args.nice)

    import torch  # once per process, before any job

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from rq import Queue
    from rq.serializers import JSONSerializer

    from onlinespec.feedback import keys
    from onlinespec.redis_server import connect
    from workers import jobs
    from workers.budget import BudgetedWorker
    from workers.trigger import Trigger

    jobs.configure(redis_url=args.redis_url, registry_root=args.registry, round_records=args.round_records,
                   learner_config=args.learner_config, drafter_configs=args.drafter_configs)
    # RQ's blocking dequeue waits up to 405 s, and RQ raises its client's socket timeout above
    # that when the worker is built; a connection opened before keeps redis-py's 5 s, and a dequeue
    # on it failed every 5 s ("could not connect", then an exponential backoff during which queued
    # rounds waited). So the worker's client is its own and opens nothing before the worker exists.
    client = connect(args.redis_url)  # the trigger's
    rq_client = connect(args.redis_url)
    queue = Queue(keys.UPDATE_QUEUE, connection=rq_client, serializer=JSONSerializer)
    tuning = Queue(keys.TUNE_QUEUE, connection=rq_client, serializer=JSONSerializer)  # `onlinespec tune run --workers`
    trigger = None
    if not args.no_trigger:
        trigger = Trigger(client, Queue(keys.UPDATE_QUEUE, connection=client, serializer=JSONSerializer),
                          args.target, min_records=args.round_records, period=args.period)
        trigger.start()
    import redis

    log = logging.getLogger("onlinespec.worker")
    backoff = 1.0
    try:
        while True:
            try:
                worker = BudgetedWorker([queue, tuning], connection=rq_client, serializer=JSONSerializer)
                worker.budget = args.budget
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
