"""Hot swap of drafter versions in a serving process, and rollback of versions that hurt.

A background thread follows the events stream (XREAD, blocking) and also polls each drafter's
latest-version key, so a missed event only delays a swap by one poll. New versions are loaded
and validated *in that thread* (checksums, exact names and shapes, finite values); the engine
loop calls :meth:`SwapWatcher.apply` between steps, where a swap is a pointer assignment.
A refused version is reported (counter + ``refused`` event) and the old one keeps serving.

Each version comes with the acceptance its learners estimated on recent traffic
(:attr:`SwapWatcher.estimates`), which the engine's draft-length controller starts it from, or,
where it follows the version it replaces, moves what that version's served drafts showed by
(:meth:`SwapWatcher.acceptance`); the pool's Hedge weights go to the :class:`~onlinespec.decode.routing.DrafterRouter`.

:meth:`SwapWatcher.observe` takes per-version own-draft counts from the engine; the watcher
thread adds them to every replica's sums in Redis and the control plane judges the serving
version on those sums (:meth:`onlinespec.learn.control.Control.judge`): when a new version, after
``min_drafted`` drafted tokens, accepts less than its parent did by more than ``margin``, the
drafter is rolled back to the parent (the learners then continue from it), once, by whichever
replica decides first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from onlinespec.feedback import keys
from onlinespec.background import Background
from onlinespec.learn.control import Control
from onlinespec.learn.estimate import overall
from onlinespec.drafters.hf import HFDrafter
from onlinespec.learn.registry import CheckpointError, Registry, expected_shapes

__all__ = ["SwapStats", "VersionStats", "SwapWatcher"]

log = logging.getLogger(__name__)


@dataclass
class VersionStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SwapStats:
    swaps: int = 0
    refusals: int = 0
    rollbacks: int = 0
    last_refusal: str = ""
    max_apply_ms: float = 0.0  # longest engine stall inside apply()
    versions: dict = field(default_factory=dict)  # (drafter, version) -> VersionStats


class SwapWatcher:
    def __init__(self, redis_client, registry: Registry, drafters: dict[str, HFDrafter], poll_seconds: float = 2.0,
                 rollback: bool = True, min_drafted: int = 2000, margin: float = 0.05, pool_target: str | None = None,
                 router=None):
        self.redis = redis_client
        self.registry = registry
        self.control = Control(redis_client, registry)
        self.drafters = drafters
        self.poll_seconds = poll_seconds
        self.rollback_enabled, self.min_drafted, self.margin = rollback, min_drafted, margin
        self.shapes = {d: expected_shapes(h.model) for d, h in drafters.items()}
        self.stats = SwapStats()
        self.parents: dict[str, int | None] = {}  # drafter -> parent of the version serving now
        self.refused: set[tuple[str, int]] = set()
        self.reasons: dict[tuple[str, int], str] = {}  # why a version does not serve (refused, rolled back)
        self.pool_target = pool_target
        self.router = router  # fed the pool's Hedge weights: who drafts for which request
        # drafter -> the acceptance estimate its serving version was published with (learn/estimate.py)
        self.estimates: dict[str, dict] = {}
        # drafter -> the estimated acceptance of the version its serving one replaced, where it is
        # a later version (a rollback or a first version: absent): what the controller moves its view by
        self.replaced: dict[str, float] = {}
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._ready: dict[str, tuple[object, int, int | None]] = {}
        self._lock = threading.Lock()
        self._last_event, self._last_poll = "$", 0.0
        self._unflushed: dict[tuple[str, int], tuple[int, int]] = {}  # own-draft counts not yet in Redis
        # follows events and polls pointers; a Redis outage is logged and counted, the task goes on
        self.task = Background("swap-watcher", self._step, period=0.0, backoff=1.0, max_backoff=5.0, log=log)

    # ------------------------------------------------------------------ background side

    def start(self) -> SwapWatcher:
        self.task.start()
        return self

    def stop(self) -> None:
        self.task.stop()

    def _step(self) -> None:
        """Wait up to half a second for events; check every drafter on one, or every poll period."""
        events = self.redis.xread({keys.events_stream: self._last_event}, count=100, block=500)
        for _, entries in events or []:
            for entry_id, _ in entries:
                self._last_event = entry_id
        if events or time.time() - self._last_poll >= self.poll_seconds:
            self._last_poll = time.time()
            self.judge()
            self.check_all()

    def check_all(self) -> None:
        for drafter, handle in self.drafters.items():
            # what this replica serves is kept from collection while it keeps saying so
            self.registry.mark_serving(drafter, self.replica, handle.version, ttl=max(30.0, 10 * self.poll_seconds))
            self.check(drafter)
        if self.pool_target is not None and self.router is not None and len(self.drafters) > 1:
            weights, groups = self.redis.hmget(keys.pool_key(self.pool_target), ["weights", "group_weights"])
            self.router.update(json.loads(weights) if weights else None, json.loads(groups) if groups else None)

    def check(self, drafter: str) -> bool:
        """Load and validate the latest version if it is new; True when one is ready to apply."""
        latest = self.registry.latest(drafter)
        current = self.drafters[drafter].version
        with self._lock:
            pending = self._ready.get(drafter)
        if latest is None or latest == current or (pending and pending[1] == latest) or (drafter, latest) in self.refused:
            return False
        try:
            serving = self.drafters[drafter].model  # a new version runs where and as the serving one does
            model, manifest = self.registry.load_model(drafter, latest, self.shapes[drafter],
                                                       device=serving.device, dtype=serving.dtype)
        except CheckpointError as exc:
            self.refused.add((drafter, latest))
            self.reasons[(drafter, latest)] = "refused: did not validate"
            self.stats.refusals += 1
            self.stats.last_refusal = str(exc)
            log.error("refused %s v%s: %s", drafter, latest, exc)
            self.redis.xadd(keys.events_stream, {"type": "refused", "drafter": drafter, "version": latest,
                                                 "reason": str(exc)[:500]}, maxlen=10_000, approximate=True)
            return False
        weights = (str(self.registry.path(drafter, latest) / "model.safetensors"), manifest.files.get("model.safetensors"))
        with self._lock:
            self._ready[drafter] = (model, latest, manifest.parent, manifest.metrics.get("acceptance_estimate") or {},
                                    weights)
        return True

    def status(self, drafter: str, latest: int | None, paused: bool = False, pinned: bool = False) -> str:
        """Why the serving version is not the latest ("" when it is): for the dashboard."""
        serving = self.drafters[drafter].version
        if latest is None or latest == serving:
            return ""
        if paused:
            return "pinned" if pinned else "paused"
        if (drafter, latest) in self.reasons:
            return self.reasons[(drafter, latest)]
        if latest < serving and (drafter, serving) in self.reasons:
            return self.reasons[(drafter, serving)]
        with self._lock:
            pending = self._ready.get(drafter)
        return "validated: swapping in at the next step" if pending and pending[1] == latest else "validating"

    # ------------------------------------------------------------------ engine-loop side

    def apply(self, install=None) -> list[tuple[str, int]]:
        """Swap in every validated version. Called between engine steps; cheap.

        ``install(drafter, version, path, sha256)``, when given, puts the version in place instead
        of the pointer swap (vLLM: its weight-update API copies the checked file in place); if it
        raises, the version is refused and the serving one stays."""
        t0 = time.perf_counter()
        with self._lock:
            ready, self._ready = self._ready, {}
        swapped = []
        for drafter, (model, version, parent, estimate, (path, digest)) in ready.items():
            before = self.drafters[drafter].version
            if install is None:
                self.drafters[drafter].swap(model, version)
            else:
                try:
                    install(drafter, version, path, digest)
                    self.drafters[drafter].version = version  # the engine holds the weights; the label here too
                except Exception as exc:  # noqa: BLE001 - whatever the engine says, the old version serves on
                    self.refused.add((drafter, version))
                    self.reasons[(drafter, version)] = "refused: the engine did not take it"
                    self.stats.refusals += 1
                    self.stats.last_refusal = str(exc)
                    log.error("the engine refused %s v%s: %s", drafter, version, exc)
                    continue
            self.parents[drafter] = parent
            previous = overall(self.estimates.get(drafter))
            if previous is not None and version > int(before or 0):
                self.replaced[drafter] = previous
            else:
                self.replaced.pop(drafter, None)
            self.estimates[drafter] = estimate
            self.stats.swaps += 1
            swapped.append((drafter, version))
        self.stats.max_apply_ms = max(self.stats.max_apply_ms, (time.perf_counter() - t0) * 1000)
        return swapped

    def acceptance(self, drafter: str) -> tuple[float | None, float | None]:
        """(the serving version's estimated acceptance on all traffic, the replaced version's
        where the serving one follows it: see :attr:`replaced`); None where not known."""
        return overall(self.estimates.get(drafter)), self.replaced.get(drafter)

    def observe(self, drafter: str, version: int, drafted: int, accepted: int) -> None:
        """The engine's own-draft counts of a step (engine loop thread: no Redis here)."""
        stats = self.stats.versions.setdefault((drafter, version), VersionStats())
        stats.drafted += drafted
        stats.accepted += accepted
        stats.steps += 1
        if drafted:
            with self._lock:
                d, a = self._unflushed.get((drafter, version), (0, 0))
                self._unflushed[(drafter, version)] = (d + drafted, a + accepted)

    def judge(self) -> list[tuple[str, int]]:
        """Add this replica's counts to every replica's in Redis, then let the control plane judge
        each serving version against its parent on the sum (watcher thread); the (drafter,
        version) pairs this call rolled back."""
        with self._lock:
            counts, self._unflushed = self._unflushed, {}
        self.control.record_acceptance(counts)
        rolled = []
        if not self.rollback_enabled:
            return rolled
        for drafter, handle in self.drafters.items():
            parent, version = self.parents.get(drafter), handle.version
            if parent is None or (drafter, version) in self.refused:
                continue
            reason = self.control.judge(drafter, version, parent, self.min_drafted, self.margin)
            if reason is None:
                continue
            self.stats.rollbacks += 1
            self.parents[drafter] = None  # do not roll back past the parent
            self.refused.add((drafter, version))
            self.reasons[(drafter, version)] = "rolled back: accepted less than its parent"
            log.warning("rolled back %s v%s -> v%s: %s", drafter, version, parent, reason)
            rolled.append((drafter, version))
        return rolled
