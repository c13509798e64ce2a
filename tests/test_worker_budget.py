"""The learning budget: a worker whose jobs may take only a share of one core rests after each."""

import time

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from onlinespec.config import WorkersConfig
from workers.__main__ import parse_args
from workers.budget import BudgetedWorker, rest_seconds


def burn(seconds: float) -> float:
    """A job: this much CPU time, spent; returns what it took."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        sum(i * i for i in range(2000))
    return time.process_time() - start


def test_rest_keeps_the_jobs_within_their_share():
    assert rest_seconds(2.0, 3.0, 0.5) == pytest.approx(1.0)  # 2 s of CPU over 4 s of wall
    assert rest_seconds(1.0, 5.0, 0.5) == 0.0  # already waited (contended): no rest
    assert rest_seconds(2.0, 2.0, 1.0) == 0.0  # the whole core: never rests
    assert rest_seconds(0.0, 0.0, 0.1) == 0.0
    with pytest.raises(ValueError, match="share of one core"):
        WorkersConfig(budget=0.0)
    with pytest.raises(ValueError, match="share of one core"):
        WorkersConfig(budget=1.5)


def test_a_worker_on_a_budget_takes_its_share_of_time_through_a_real_queue(redis_client):
    """Two jobs of real CPU work through RQ (JSON serializer): at a budget of 0.5 the burst lasts
    at least twice the CPU time the jobs took; at 1.0 it does not rest at all."""
    queue = Queue(f"budget-{time.time_ns()}", connection=redis_client, serializer=JSONSerializer)
    for budget in (1.0, 0.5):
        jobs = [queue.enqueue(burn, 0.25) for _ in range(2)]
        worker = BudgetedWorker([queue], connection=redis_client, serializer=JSONSerializer)
        worker.budget = budget
        rests = []
        rest = worker.rest
        worker.rest = lambda seconds: (rests.append(seconds), rest(seconds))
        t0 = time.perf_counter()
        worker.work(burst=True, logging_level="WARNING")
        wall = time.perf_counter() - t0
        cpu = sum(job.latest_result().return_value for job in jobs)
        assert all(job.get_status() == "finished" for job in jobs)
        assert len(rests) == 2
        if budget == 1.0:
            assert rests == [0.0, 0.0]
        else:  # a job that waited for the CPU as long as it ran rests no more (contended cores)
            assert wall >= cpu / budget * 0.95, (wall, cpu)


def test_a_warm_shutdown_ends_the_rest(redis_client):
    worker = BudgetedWorker([Queue("budget-stop", connection=redis_client)], connection=redis_client)
    worker._stop_requested = True
    t0 = time.perf_counter()
    worker.rest(60.0)
    assert time.perf_counter() - t0 < 1.0


def test_the_budget_comes_from_the_config_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("ONLINESPEC_WORKERS__BUDGET", "0.25")
    assert parse_args(["--config", "configs/tiny.yaml"]).budget == 0.25
    assert parse_args(["--config", "configs/tiny.yaml", "--budget", "0.5"]).budget == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--config", "configs/tiny.yaml", "--budget", "2"])


def test_a_warm_shutdown_does_not_wait_on_the_command_listener(redis_client):
    """RQ's shutdown unsubscribes, then stops its command-listener thread; with redis-py 8 the
    stop waits for the thread. A listener already back in its read when the stop comes (here:
    unsubscribed first, as the race leaves it) held RQ's shutdown for its full 60 s sleep; the
    worker's listener wakes every second."""
    worker = BudgetedWorker([Queue(f"shutdown-{time.time_ns()}", connection=redis_client,
                                   serializer=JSONSerializer)], connection=redis_client, serializer=JSONSerializer)
    worker.subscribe()
    assert worker.pubsub_thread.is_alive()
    worker.pubsub.unsubscribe()
    time.sleep(0.5)  # the listener reads the reply and waits again
    start = time.perf_counter()
    worker.unsubscribe()
    assert time.perf_counter() - start < 5.0
    worker.pubsub_thread.join(5.0)
    assert not worker.pubsub_thread.is_alive()


def test_an_idle_worker_keeps_its_dequeue_open_and_stops_at_once(redis_url, tmp_path):
    """`python -m workers` left idle longer than redis-py's default 5 s socket timeout: its
    blocking dequeue stays open (it used to fail every 5 s, log "could not connect" and back off
    exponentially while queued rounds waited), and a SIGTERM ends it within seconds."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--target", f"idle{time.time_ns()}",
                               "--registry", str(tmp_path / "registry"), "--period", "1", "--nice", "0"],
                              env={**os.environ, "PYTHONPATH": root, "REDIS_URL": redis_url},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(12)
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        start = time.perf_counter()
        log = worker.communicate(timeout=30)[0]
        stopped = time.perf_counter() - start
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "subscribing to channel" in log, log[-2000:]  # it ran
    assert "could not connect" not in log and "Timeout reading" not in log, log[-2000:]
    assert stopped < 10, stopped
