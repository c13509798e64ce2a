"""One convention for background tasks: named, started and stopped by their owner, errors
logged and counted without ending the task, all of them visible in /metrics."""

import threading
import time

import httpx

from onlinespec.background import Background, tasks


def test_a_task_survives_its_errors_and_stops_when_told():
    calls, done = [], threading.Event()

    def step():
        calls.append(time.time())
        if len(calls) <= 2:
            raise ConnectionError("redis away")
        done.set()

    task = Background("test-flaky", step, period=0.01, backoff=0.01).start()
    assert done.wait(5)
    assert task.alive and task.errors == 2 and "redis away" in task.last_error and task.runs >= 1
    assert any(t is task for t in tasks()) and any(t.name == "test-flaky" for t in threading.enumerate())
    task.stop()
    assert not task.alive
    assert not any(t is task for t in tasks())  # stopped by its owner: /metrics no longer lists it
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n  # stopped means stopped


def test_metrics_list_the_servers_background_tasks(service):
    srv, _, _ = service
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    for name in ("swap-watcher", "dashboard-sampler"):
        assert f'onlinespec_background_alive{{task="{name}"}} 1' in text, name
        assert f'onlinespec_background_errors_total{{task="{name}"}}' in text
