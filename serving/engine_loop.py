"""The engine loop: one thread owns the engine and steps every active request together.

Requests wait in a bounded queue; up to ``max_active`` are served at once in a continuous
batch (:class:`~onlinespec.decode.batch.Batch`): each step is one target forward for all of them
(ragged: each row its own length, position and drafts), and requests join and leave between
steps. Between steps the loop applies hot swaps. Every step's output goes to the request's
asyncio queue; a cancelled request (client gone) leaves the batch before the next step. Each
finished request's feedback record goes to the writer.

No request can stop the loop: any exception while starting or settling a request fails that
request alone (it gets the error; the others go on). An exception outside a request (a swap, a
metric, a forward) restarts the loop after a short backoff: the requests it held get an error,
the restart is counted (``engine_loop_restarts_total``) and readiness is false until a pass
completes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import Generation, SpeculativeEngine, StepOutput
from onlinespec.errors import InvalidRequestError
from onlinespec.learn.estimate import ALL, group_of
from onlinespec.decode.sampling import SamplingParams
from serving.metrics import Metrics

__all__ = ["QueueFull", "RequestHandle", "LoopBase", "EngineLoop"]

log = logging.getLogger(__name__)

MAX_TRAFFIC_GROUPS = 256  # traffic groups counted apart for the dashboard; the rest count as "other"


class QueueFull(Exception):
    """More requests are waiting than the configured queue depth."""


@dataclass
class RequestHandle:
    prompt: list[int]
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    generation: Generation | None = None
    error: Exception | None = None
    tenant: str | None = None  # from the API key (and ``user``): scopes suffix speculation, tags feedback
    domain: str | None = None  # ``metadata.domain``: the request's traffic group (drafter choice, estimates)
    cache_salt: str | None = None  # the prefix cache serves it only what requests with this salt left
    # streamed: every step's output is handed over as it comes; otherwise they are kept and handed
    # over at the end in one list (one wake-up of the event loop per request, not per step)
    stream: bool = True
    held: list = field(default_factory=list)
    done: bool = False  # finished or failed (set by the engine thread)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def in_flight(self) -> bool:
        """Waiting or running: neither done nor given up by its client."""
        return not (self.done or self.cancelled)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # its event loop is closed (server shutting down): nobody is listening
            self.cancelled = True


class LoopBase:
    """What every engine loop shares, whichever engine it steps (:class:`EngineLoop`, or
    :class:`serving.vllm_loop.VllmLoop`): the waiting queue and ``submit``, the thread and its
    supervisor (a crash outside any request fails the requests held, is counted, and the loop
    comes back after a backoff), traffic counts, per-drafter draft counters, and handing a step's
    output to its request. A loop implements ``_serve`` (its passes) and ``_crashed`` (forget
    the requests it held and return them)."""

    name = "engine loop"

    def __init__(self, metrics: Metrics, writer=None, watcher=None, max_active: int = 8, max_queue: int = 64,
                 drafters: dict | None = None, router=None):
        """``router``: draws each request's drafter among ``drafters``
        (:class:`~onlinespec.decode.routing.DrafterRouter`); None: the default drafter drafts for all."""
        self.drafters = drafters or {}
        self.router = router
        self.traffic: dict[str, int] = {}  # requests started per traffic group (the dashboard's)
        self.metrics = metrics
        self.writer = writer
        self.watcher = watcher
        self.max_active = max_active
        self.max_queue = max_queue
        self.pending: queue.Queue[RequestHandle] = queue.Queue()
        self.active: dict = {}  # the requests being served -> their handles
        self.healthy = True  # false from a crash of the loop until its next clean pass
        self.restarts = 0
        self.last_crash = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name.replace(" ", "-"), daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def alive(self) -> bool:
        """The loop thread runs and its last pass completed (what readiness reports)."""
        return self._thread.is_alive() and self.healthy

    @property
    def depth(self) -> int:
        return self.pending.qsize() + len(self.active)

    def prepare(self, params: SamplingParams) -> None:
        """Work a structured-output request needs before it is queued that should not hold the
        loop (the server calls it in a thread): an :class:`~onlinespec.errors.InvalidRequestError`
        refuses the request."""

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse (:class:`~onlinespec.errors.InvalidRequestError`) before queueing what the engine
        would refuse when it starts the request: a streamed request gets a 400, not an error
        event after its 200. Cheap: the server calls it on its event loop."""

    def submit(self, prompt: list[int], params: SamplingParams, tenant: str | None = None,
               domain: str | None = None, stream: bool = True, cache_salt: str | None = None) -> RequestHandle:
        return self.submit_all([(prompt, params)], tenant, domain, stream, cache_salt)[0]

    def submit_all(self, requests: list[tuple[list[int], SamplingParams]], tenant: str | None = None,
                   domain: str | None = None, stream: bool = True, cache_salt: str | None = None
                   ) -> list[RequestHandle]:
        """One request for each (prompt, params) pair (an API request's prompts and their ``n``
        choices), queued together or not at all (:class:`QueueFull`)."""
        waiting = self.pending.qsize()  # the engine thread only takes from the queue: room does not shrink
        if waiting + len(requests) > self.max_queue:
            need = f"; this request needs room for {len(requests)}" if len(requests) > 1 else ""
            raise QueueFull(f"{waiting} requests are already waiting (max_queue={self.max_queue}){need}")
        handles = [RequestHandle(prompt, p, asyncio.Queue(), asyncio.get_running_loop(), tenant=tenant,
                                 domain=domain, stream=stream, cache_salt=cache_salt) for prompt, p in requests]
        for handle in handles:
            self.pending.put(handle)
        self.metrics.queue_depth.set(self.depth)
        return handles

    def _count_traffic(self, group: str | None, drafter) -> None:
        """A request started in ``group``, drafting with ``drafter`` (or none)."""
        key = group or ALL
        if key not in self.traffic and len(self.traffic) >= MAX_TRAFFIC_GROUPS:
            key = "other"  # domains are the clients' to name: the table stays bounded
        self.traffic[key] = self.traffic.get(key, 0) + 1
        if drafter is not None:
            self.metrics.routed.inc(drafter=drafter.drafter_id)

    def _observe_drafts(self, drafter, out: StepOutput) -> None:
        """A step's drafts in the per-drafter counters, and the drafter's own in the rollback guard."""
        if not out.drafted:
            return
        # without a drafter model every draft is a copy: counted under drafter "none"
        did, version = (drafter.drafter_id, drafter.version) if drafter is not None else ("none", 0)
        self.metrics.observe_step(did, version, out.drafted, out.accepted, out.copied, out.copied_accepted,
                                  out.predicted, out.predicted_accepted)
        if self.watcher is not None and drafter is not None and out.own_drafted:
            # the rollback guard judges the drafter's own drafts: copies do not depend on its version
            self.watcher.observe(drafter.drafter_id, drafter.version, out.own_drafted, out.own_accepted)

    def _deliver(self, handle: RequestHandle, out: StepOutput) -> None:
        """Hand a step's output to its request (every step when streamed, else all at the end);
        the first token's and a finished request's timings and counters."""
        if out.tokens and handle.first_token is None:
            handle.first_token = time.perf_counter()
            self.metrics.ttft.observe(handle.first_token - handle.submitted)
        self.metrics.generated_tokens.inc(len(out.tokens))
        if handle.stream:
            handle._put(out)
        else:
            handle.held.append(out)
            if out.finished:
                handle._put(handle.held)
        if out.finished:
            handle.done = True
            self.metrics.latency.observe(time.perf_counter() - handle.submitted)
            self.metrics.requests.inc(label=out.finish_reason.value)

    def _fail(self, handle: RequestHandle, exc: Exception) -> None:
        handle.error = exc
        handle.done = True
        self.metrics.request_errors.inc(label="invalid" if isinstance(exc, InvalidRequestError) else "internal")
        handle._put(exc)

    def _run(self) -> None:
        """Supervises :meth:`_serve`: a crash outside any request restarts it after a backoff."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._serve()
            except Exception as exc:  # noqa: BLE001 - the loop must come back whatever went wrong
                self.healthy = False
                self.restarts += 1
                self.metrics.loop_restarts.inc()
                self.last_crash = f"{type(exc).__name__}: {exc}"
                log.exception("%s crashed (restart %d in %.1fs)", self.name, self.restarts, backoff)
                for handle in self._crashed():
                    self._fail(handle, RuntimeError(f"engine loop restarted: {self.last_crash}"))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _serve(self) -> None:
        raise NotImplementedError

    def _crashed(self) -> list[RequestHandle]:
        raise NotImplementedError


class EngineLoop(LoopBase):
    def __init__(self, engine: SpeculativeEngine, metrics: Metrics, writer=None, watcher=None,
                 max_active: int = 8, max_queue: int = 64, drafters: dict | None = None,
                 prefill_tokens: int = 256, kv_cache_tokens: int | None = None, prefix_cache_tokens: int = 0,
                 prefix_cache_scope: str = "shared", router=None):
        self.engine = engine
        self.prefill_tokens = prefill_tokens
        self.kv_cache_tokens = kv_cache_tokens
        self.prefix_cache_tokens = prefix_cache_tokens
        self.prefix_cache_scope = prefix_cache_scope
        self._held: RequestHandle | None = None  # started, waiting for key/value room
        super().__init__(metrics, writer, watcher, max_active, max_queue, drafters, router)
        self.batch = self._new_batch()
        self.active: dict[Generation, RequestHandle] = {}  # the batch's requests

    @property
    def default_drafter(self):
        """The drafter a request gets without a router (the dashboard's routing without a pool)."""
        return self.engine.drafter

    def prepare(self, params: SamplingParams) -> None:
        """A structured output's grammar compiled here (in the caller's thread), not in the loop."""
        if params.structure is not None:
            self.engine.structured().prepare(params.structure)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        self.engine.check(prompt, params)
        self.batch.check_admissible(len(prompt), params.max_new_tokens)

    def _new_batch(self) -> Batch:
        return Batch(self.engine, slots=self.max_active, prefill_tokens=self.prefill_tokens,
                     kv_tokens=self.kv_cache_tokens, prefix_tokens=self.prefix_cache_tokens,
                     prefix_scope=self.prefix_cache_scope)

    @property
    def depth(self) -> int:
        return super().depth + (self._held is not None)

    def _admit(self) -> None:
        """Start waiting requests while the batch has a slot and key/value room for them, first
        come first served (a request that does not fit yet holds the line until one leaves)."""
        while self.batch.room > 0:
            handle, self._held = self._held, None
            if handle is None:
                try:
                    handle = self.pending.get(timeout=0.05 if not self.active else 0)
                except queue.Empty:
                    return
            if handle.cancelled:
                self.metrics.cancelled.inc()
                continue
            if handle.generation is None:
                try:
                    handle.generation = self._start(handle)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop the loop
                    if not isinstance(exc, InvalidRequestError):
                        log.exception("request failed to start")
                    self._fail(handle, exc)
                    continue
            if not self.batch.fits(handle.generation):
                self._held = handle  # waits for memory: the batch's requests go on
                return
            self.batch.add(handle.generation)
            self.active[handle.generation] = handle

    def _start(self, handle: RequestHandle) -> Generation:
        suffix = self.engine.suffix
        isolated = suffix is not None and suffix.config.isolates(handle.tenant)
        # its drafter: drawn from the pool's weights for its traffic group (the engine's without a pool)
        group = group_of(handle.tenant, handle.domain)
        choice = self.router.pick(group) if self.router is not None else None
        drafter = self.drafters[choice] if choice in self.drafters else "default"
        gen = self.engine.start(handle.prompt, handle.params, tenant=handle.tenant, isolated=isolated,
                                drafter=drafter, domain=handle.domain)
        gen.cache_salt = handle.cache_salt
        self._count_traffic(group, gen.drafter)
        self.batch.check_admissible(len(gen.prompt), gen.params.max_new_tokens)
        return gen

    def _crashed(self) -> list[RequestHandle]:
        held = list(self.active.values())
        self.active.clear()
        # their rows may be half-updated: fail them (the waiting ones stay) and start afresh; the
        # prefix cache too (a store may have stopped half-way), its counters going on from where
        # they were (a Prometheus counter never goes down)
        old = self.batch.prefix
        self.batch = self._new_batch()
        if old is not None and self.batch.prefix is not None:
            self.batch.prefix.stats.carry(old.stats)
        return held

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self.metrics.queue_depth.set(self.depth)
            for gen, handle in list(self.active.items()):
                if handle.cancelled:
                    self.metrics.cancelled.inc()
                    self.batch.remove(gen)
                    del self.active[gen]
            if not self.active:
                self.healthy = True  # an idle pass is a clean pass too: ready for traffic again
                continue
            if self.watcher is not None:
                for drafter, version in self.watcher.apply():
                    self.metrics.swaps.inc()
                    # the new version starts from what the served drafts of the one it replaces
                    # showed, moved by what its learners measured without drafting (or from that
                    # estimate alone: BatchK.start_version)
                    estimate, previous = self.watcher.acceptance(drafter)
                    self.engine.k_controller.start_version(drafter, estimate, previous)
                    log.info("swapped in %s v%s (estimated acceptance %s)", drafter, version,
                             "-" if estimate is None else f"{estimate:.3f}")
            for gen, out in self.batch.step():
                handle = self.active[gen]
                if isinstance(out, Exception):
                    log.error("request failed", exc_info=out)
                    del self.active[gen]
                    self._fail(handle, out)
                    continue
                self._emit(handle, out)
                if gen.finished:
                    del self.active[gen]
            self.metrics.observe_batch(self.batch.last, self.batch.kv_bytes, self.batch.reserved)
            self.healthy = True

    def _emit(self, handle: RequestHandle, out: StepOutput) -> None:
        gen = handle.generation
        self._observe_drafts(gen.drafter, out)
        self._deliver(handle, out)
        if gen.finished:
            if self.writer is not None:
                record = gen.record()
                if record is not None:
                    self.writer.submit(record, gen.captured_features())
