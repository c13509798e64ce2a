"""One convention for background work: a named task that its owner starts and stops.

A :class:`Background` runs ``step()`` again and again in a daemon thread named after it,
waiting ``period`` seconds between steps (a step may also block on its own, as an XREAD does).
An exception in a step is logged and counted (``errors``, ``last_error``) and the task goes on
after a backoff (doubling to ``max_backoff``, reset by the next clean step): a task never dies
of one error. ``stop()`` ends it and waits for the thread. Every task started in the process and
not stopped by its owner is listed by :func:`tasks` (a task whose thread died stays listed, not
alive), which ``/metrics`` reports (``onlinespec_background_errors_total``,
``onlinespec_background_alive`` per task). A stopped task leaves the list, so a process that
builds its server again (the tests do) reports the new task, not the old one of the same name.

The engine loop (``serving/engine_loop.py``) and the feedback writer (``onlinespec/feedback/stream.py``)
keep loops of their own, because each needs what this does not give (the loop fails the batch
it held and reports readiness; the writer drains its buffer on stop), and report the same
things: their restarts or failed writes are counted and shown in ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import weakref

__all__ = ["Background", "tasks"]

_TASKS: weakref.WeakSet = weakref.WeakSet()


def tasks() -> list[Background]:
    """Every task of this process that was started and not stopped, by name."""
    return sorted(list(_TASKS), key=lambda t: t.name)


class Background:
    def __init__(self, name: str, step, period: float = 0.0, backoff: float = 0.1, max_backoff: float = 5.0,
                 log: logging.Logger | None = None):
        self.name, self.step, self.period = name, step, period
        self.backoff, self.max_backoff = backoff, max_backoff
        self.log = log or logging.getLogger(__name__)
        self.runs = 0
        self.errors = 0
        self.last_error = ""
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Background:
        if self._thread is None or not self._thread.is_alive():
            self.stopping.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            _TASKS.add(self)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self.alive:  # stopped by its owner: no longer one of the process's tasks
            _TASKS.discard(self)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the task is being stopped (for steps that wait)."""
        return self.stopping.wait(seconds)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        return {"name": self.name, "alive": self.alive, "runs": self.runs, "errors": self.errors,
                "last_error": self.last_error}

    def _run(self) -> None:
        backoff = self.backoff
        while not self.stopping.is_set():
            try:
                self.step()
                self.runs += 1
                backoff = self.backoff
                wait = self.period
            except Exception as exc:  # noqa: BLE001 - a background task outlives any one error
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                self.log.warning("%s: %s (error %d; again in %.1fs)", self.name, self.last_error, self.errors, backoff)
                wait, backoff = backoff, min(backoff * 2, self.max_backoff)
            if wait > 0 and self.stopping.wait(wait):
                return
