"""`onlinespec up` supervises its children: one that exits is restarted with backoff, and the
restart is said; stopping stops every child."""

import io
import subprocess
import sys
import time

from onlinespec.ops import up


def test_a_child_that_exits_is_restarted_with_backoff(monkeypatch):
    monkeypatch.setattr(up, "BACKOFF", (0.2, 0.4))
    log = io.StringIO()
    sup = up.Supervisor(log=log)
    starts = []

    def start():
        starts.append(time.time())
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])

    crashing = sup.add("crashing", start)
    steady = sup.add("steady", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
    deadline = time.time() + 10
    while crashing.restarts < 3 and time.time() < deadline:
        sup.poll()
        time.sleep(0.05)
    assert crashing.restarts >= 3 and steady.restarts == 0
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.4  # backoff, the last step repeating
    assert "crashing exited with 3: restarting in" in log.getvalue() and "crashing restarted" in log.getvalue()
    sup.stop()
    assert steady.proc.poll() is not None  # stopped, not left behind


def test_a_child_that_cannot_start_is_retried_not_fatal(monkeypatch):
    monkeypatch.setattr(up, "BACKOFF", (0.1,))
    log = io.StringIO()
    sup = up.Supervisor(log=log)
    attempts = []

    def start():
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("port busy")
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

    child = up.Child("flaky", start)
    child.proc = up._Exited(RuntimeError("first start failed"))
    sup.children.append(child)
    deadline = time.time() + 5
    while len(attempts) < 3 and time.time() < deadline:
        sup.poll()
        time.sleep(0.05)
    assert len(attempts) == 3 and child.proc.poll() is None and "could not be restarted: port busy" in log.getvalue()
    sup.stop()


def test_stop_can_end_the_workers_alone():
    """``stop(only="worker")``: learning stops, the server and Redis go on (bench live's closing
    comparison); a plain ``stop()`` then ends the rest."""
    sup = up.Supervisor(log=io.StringIO())
    sleeper = lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # noqa: E731
    server, worker = sup.add("server", sleeper), sup.add("worker-1", sleeper)
    sup.stop(only="worker")
    assert worker.proc.poll() is not None and server.proc.poll() is None
    sup.stop()
    assert server.proc.poll() is not None
