"""A bound on how long the server's stop may take.

A server asked to stop (SIGTERM, Ctrl-C) first lets its in-flight requests finish (uvicorn's
graceful shutdown), then stops what it owns: the engine loop, vLLM's engine core and workers,
the swap watcher, the feedback writer. Any of those can hang (a vLLM worker that does not answer, a
thread blocked in a call), and a server that does not exit holds its port and its memory until an
orchestrator kills it, leaving its child processes behind. :class:`StopDeadline` bounds it: armed
when the stop begins, it ends the process if the stop has not finished in time, having written
every thread's stack to stderr (what hung) and killed the process's children (vLLM's engine core
and workers), so a hung stop is one a user can read about and nothing outlives the server. Where
no Python thread can run any more, faulthandler's watchdog ends it 5 s later (the children then
end on their parent's death, as vLLM's watch for it).
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import sys
import threading

__all__ = ["StopDeadline"]

log = logging.getLogger("onlinespec.server")


class StopDeadline:
    """``arm(seconds)`` when the stop begins: that long after, unless the process has exited, it
    writes every thread's stack to stderr, kills the process's child processes and exits with
    ``code``."""

    def __init__(self, code: int = 1):
        self.code = code
        self.seconds: float | None = None
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> None:
        """Start counting (once: a second call keeps the first deadline)."""
        if seconds <= 0:
            raise ValueError(f"a stop deadline is a positive number of seconds, got {seconds}")
        if self._thread is not None:
            return
        self.seconds = seconds
        self._thread = threading.Thread(target=self._expire, name="stop-deadline", daemon=True)
        self._thread.start()
        # a backstop that needs no Python thread (one that holds the GIL in a C loop would starve
        # the one above): faulthandler's own watchdog writes the stacks and exits, 5 s later
        faulthandler.dump_traceback_later(seconds + 5, exit=True)

    def _expire(self) -> None:
        threading.Event().wait(self.seconds)
        log.error("the server's stop took over %.0f s: ending it (the threads' stacks follow)", self.seconds)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except Exception:  # noqa: BLE001 - no usable stderr: the exit matters more than the stacks
            pass
        for child in multiprocessing.active_children():
            log.error("killing child process %s (pid %s)", child.name, child.pid)
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(self.code)
