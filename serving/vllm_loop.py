"""The engine loop for ``serving.engine: vllm``: one thread steps vLLM's engine for every request.

The same surface as :class:`serving.engine_loop.EngineLoop` (``submit`` hands back a
:class:`~serving.engine_loop.RequestHandle` whose queue receives :class:`StepOutput` items), so the
OpenAI routes, metrics, dashboard and admin routes do not know which engine serves. vLLM
batches, schedules, verifies and samples; OnlineSpec's proposer
(:class:`~onlinespec.vllm_backend.proposer.OnlineSpecProposer`) drafts inside it. This loop

- picks each request's drafter as the embedded engine does (the pool's router for its traffic
  group) and tells the proposer before vLLM's next step;
- applies validated drafter versions between steps through vLLM's weight-update API
  (``start_draft_weight_update``, ``update_weights``, ``finish_weight_update``; the ``onlinespec``
  transfer backend copies the checked file in place, :mod:`onlinespec.vllm_backend.transfer`): the
  proposer drafts with them from the next step; a version vLLM refuses is refused as a corrupt
  one is (the serving version stays). It feeds the rollback guard the drafters' counts, and a
  rollback or a pin reaches vLLM the same way;
- turns each finished request into the feedback record the learners read: vLLM's top-K raw
  log-probs at every generated position (requested from vLLM, no extra target pass) joined with
  the proposer's per-step drafts and accepted counts.

The loop reaches the proposer through a :class:`~onlinespec.vllm_backend.link.ProposerLink` (vLLM's
``collective_rpc`` and OnlineSpec's worker extension, plain data once per step), so the proposer
may run in this process (the default: vLLM's engine in process, drafters shared with the server)
or in vLLM's own processes (``serving.vllm.multiprocessing``, ``tensor_parallel_size`` > 1).
"""

from __future__ import annotations

import json
import logging
import queue
import uuid

import numpy as np

from onlinespec.decode.engine import GenerationStats, StepOutput, TokenLogprob, check_request
from onlinespec.decode.stops import FinishReason
from onlinespec.decode.sampling import SamplingParams
from onlinespec.errors import InvalidRequestError
from onlinespec.feedback.record import RecordBuilder
from onlinespec.learn.estimate import group_of
from serving.engine_loop import LoopBase, RequestHandle
from serving.metrics import Metrics

__all__ = ["VllmGeneration", "VllmLoop", "feedback_record", "prefix_salt", "vllm_exposition"]

log = logging.getLogger(__name__)


def prefix_salt(scope: str, tenant: str | None, cache_salt: str | None) -> str | None:
    """vLLM's ``cache_salt`` for a request: its prefix cache then serves it only what requests with
    the same salt left, as the embedded engine's trees do (``serving.prefix_cache_scope``: under
    ``tenant`` each tenant has its own; a request with neither a tenant nor a salt a fresh one, so
    it reads nothing and nobody reads what it leaves)."""
    if scope != "tenant":
        return cache_salt
    if tenant is None and cache_salt is None:
        return json.dumps(["isolated", uuid.uuid4().hex])
    return json.dumps(["tenant", tenant, cache_salt])  # one string per pair, none shared by two


class VllmGeneration:
    """A request served by vLLM: what the API reads (``stats``, ``finished``, ``drafter``)."""

    def __init__(self, request_id: str, drafter, k: int):
        self.request_id = request_id  # the id vLLM returned (the proposer's key)
        self.drafter = drafter
        self.k = k
        self.stats = GenerationStats()
        self.tokens: list[int] = []
        self.logprobs: list[dict] = []  # vLLM's per position {token id: Logprob}
        self.finished = False
        self.cached_tokens = 0  # prompt tokens vLLM's prefix cache served
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()  # the prompt's from its second token (vLLM's first output)


class VllmLoop(LoopBase):
    name = "vLLM engine loop"

    def __init__(self, engine, link, metrics: Metrics, target_id: str, writer=None, watcher=None,
                 max_active: int = 8, max_queue: int = 64, drafters: dict | None = None, router=None,
                 k: int | None = None, feedback_topk: int = 32, prefix_scope: str = "shared"):
        super().__init__(metrics, writer, watcher, max_active, max_queue, drafters, router)
        self._refused = _client_errors()
        self.engine = engine  # vllm.v1.engine.llm_engine.LLMEngine
        self.link = link  # ProposerLink: the proposer inside vLLM (None: no speculation)
        self.target_id = target_id
        self.k = k  # None: each step's length from the proposer's StepK, up to num_speculative_tokens
        self.feedback_topk = feedback_topk
        self.prefix_scope = prefix_scope  # serving.prefix_cache_scope, through vLLM's cache_salt
        self.active: dict[str, RequestHandle] = {}  # the id the request was added with -> handle
        self.record_failures = 0  # finished requests whose record did not validate (not written)
        self.record_gaps = 0  # generated positions the proposer's log did not cover (logged as undrafted)

    def stop(self) -> None:
        """Stop the loop, then vLLM's engine: with its engine core or workers in processes of their
        own, those processes end with the server, not after it."""
        super().stop()
        try:
            self.engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - already down, or an engine without processes to stop
            log.debug("vLLM engine shutdown", exc_info=True)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """What vLLM's input processor would refuse when the request is added, refused before it
        is queued: an empty prompt, one as long as the model's length, token ids outside its
        vocabulary (a ``k`` past the proposer's is cut to it, not refused)."""
        config = self.engine.model_config
        check_request(prompt, params, config.get_vocab_size(), None, None)
        if len(prompt) >= config.max_model_len:
            raise InvalidRequestError(f"the prompt ({len(prompt)} tokens) leaves no room in the model's length "
                                      f"of {config.max_model_len} tokens")

    @property
    def default_drafter(self):
        """The drafter a request gets without a router (the dashboard's routing without a pool)."""
        return next(iter(self.drafters.values()), None)

    # ------------------------------------------------------------------ the loop thread

    def _install(self, drafter: str, version: int, path: str, sha256: str) -> None:
        """A validated version into vLLM through its weight-update API (between steps)."""
        from onlinespec.vllm_backend.engine import update_drafter
        from onlinespec.vllm_backend.transfer import UpdateInfo

        update_drafter(self.engine, UpdateInfo(drafter, version, path, sha256))

    def _crashed(self) -> list[RequestHandle]:
        held, self.active = self.active, {}
        for ext, handle in held.items():
            self._drop(ext, handle)
        return list(held.values())

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._admit()
            for ext, handle in list(self.active.items()):
                if handle.cancelled:
                    self.metrics.cancelled.inc()
                    self._drop(ext, handle)
                    del self.active[ext]
            self.metrics.queue_depth.set(self.depth)
            if not self.active:
                self.healthy = True
                continue
            if self.watcher is not None:
                for drafter, version in self.watcher.apply(install=self._install if self.link else None):
                    self.metrics.swaps.inc()
                    log.info("swapped in %s v%s", drafter, version)
            if self.link is not None:
                self.link.flush()  # new requests' drafters, aborted ones, outputs to copy from
            outputs = self.engine.step()
            self.metrics.engine_steps.inc()
            if self.link is not None:  # the step's draft counts, and the logs of the requests it finished
                self.link.sync([self.active[o.request_id].generation.request_id for o in outputs
                                if o.finished and o.request_id in self.active])
            for out in outputs:
                handle = self.active.get(out.request_id)
                if handle is not None:
                    self._emit(out.request_id, handle, out)
            self.healthy = True

    def _admit(self) -> None:
        while len(self.active) < self.max_active:
            try:
                handle = self.pending.get(timeout=0.05 if not self.active else 0)
            except queue.Empty:
                return
            if handle.cancelled:
                self.metrics.cancelled.inc()
                continue
            ext = uuid.uuid4().hex
            try:
                handle.generation = self._start(ext, handle)
            except self._refused as exc:  # vLLM refused it (too long, settings it rejects): a 400
                self._fail(handle, exc if isinstance(exc, InvalidRequestError) else InvalidRequestError(str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the loop
                log.exception("request failed to start")
                self._fail(handle, exc)
                continue
            self.active[ext] = handle

    def _start(self, ext: str, handle: RequestHandle) -> VllmGeneration:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        p = handle.params
        group = group_of(handle.tenant, handle.domain)
        choice = self.router.pick(group) if self.router is not None else None
        drafter = self.drafters.get(choice) if choice is not None else self.default_drafter
        k = p.k if p.k is not None else self.k
        adaptive = k is None
        if adaptive:
            k = self.link.k_max if self.link is not None else 0
        # top-K for the feedback record, and the request's own log-probs when it asked for them
        want = max(self.feedback_topk if self.writer is not None else 0, p.logprobs or 0)
        sampling = VllmSampling(
            max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
            seed=p.seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos, logprobs=want or None, output_kind=RequestOutputKind.DELTA,
            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
            repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None, min_tokens=p.min_tokens,
            min_p=p.min_p, allowed_token_ids=list(p.allowed_token_ids) or None,
            prompt_logprobs=p.prompt_logprobs, structured_outputs=_structured(p.structure))
        prompt = {"prompt_token_ids": list(handle.prompt)}
        salt = prefix_salt(self.prefix_scope, handle.tenant, handle.cache_salt)
        if salt is not None:
            prompt["cache_salt"] = salt
        request_id = self.engine.add_request(ext, prompt, sampling)
        if self.link is not None:
            suffix = self.link.suffix_config
            self.link.assign(request_id, drafter.drafter_id if drafter is not None else None, k, adaptive=adaptive,
                             scope=suffix.scope_of(handle.tenant) if suffix is not None else None,
                             isolated=suffix is not None and suffix.isolates(handle.tenant))
        self._count_traffic(group, drafter)
        return VllmGeneration(request_id, drafter, k)

    def _drop(self, ext: str, handle: RequestHandle) -> None:
        """Abort a request in vLLM and forget its drafts (cancelled, or the loop restarting)."""
        try:
            self.engine.abort_request([ext])
        except Exception:  # noqa: BLE001 - already gone
            pass
        if handle.generation is not None and self.link is not None:
            self.link.forget(handle.generation.request_id)

    def _emit(self, ext: str, handle: RequestHandle, out) -> None:
        gen: VllmGeneration = handle.generation
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        drafted = accepted = copied = copied_accepted = 0
        for d, a, is_copy in (self.link.take(gen.request_id) if self.link is not None else ()):
            gen.stats.add(d, a, 0.0, 0.0)
            drafted, accepted = drafted + d, accepted + a
            if is_copy:
                gen.stats.copied += d
                gen.stats.copied_accepted += a
                gen.stats.copy_steps += 1
                copied, copied_accepted = copied + d, copied_accepted + a
            else:
                gen.stats.own_steps += 1
                gen.stats.own_judged += min(a + 1, d)
        gen.stats.steps += 0 if drafted else 1
        gen.tokens += tokens
        gen.cached_tokens = getattr(out, "num_cached_tokens", None) or gen.cached_tokens
        positions = list(completion.logprobs or [])
        gen.logprobs += positions
        scored = getattr(out, "prompt_logprobs", None)
        if scored and not gen.prompt_logprobs:  # vLLM's first is None: nothing predicts the prompt's first token
            gen.prompt_logprobs = _request_logprobs(handle.prompt[1:], scored[1:], handle.params.prompt_logprobs) or ()
        gen.finished = out.finished
        reason = None
        if out.finished:
            reason = FinishReason.LENGTH if completion.finish_reason == "length" else FinishReason.STOP
        step = StepOutput(tokens=tokens, text=completion.text or "", drafted=drafted, accepted=accepted,
                          copied=copied, copied_accepted=copied_accepted,
                          finished=out.finished, finish_reason=reason,
                          logprobs=_request_logprobs(tokens, positions, handle.params.logprobs))
        self._observe_drafts(gen.drafter, step)
        self._deliver(handle, step)
        if out.finished:
            del self.active[ext]
            draft_log = self.link.finish(gen.request_id) if self.link is not None else None
            suffix = self.link.suffix_config if self.link is not None else None
            if suffix is not None and not suffix.isolates(handle.tenant):
                # what it wrote can be copied by the next requests of its scope (an isolated one leaves nothing)
                self.link.add_output(list(handle.prompt), gen.tokens, suffix.scope_of(handle.tenant))
            if self.writer is not None and gen.tokens and len(gen.logprobs) == len(gen.tokens):
                try:
                    record, gaps = feedback_record(handle, gen, draft_log, self.target_id, self.feedback_topk)
                except ValueError:  # a record that does not validate is not written; serving goes on
                    self.record_failures += 1
                    log.exception("feedback record of request %s not written", ext)
                    return
                self.record_gaps += gaps
                self.writer.submit(record)


def _structured(structure):
    """vLLM's structured output for a request's :class:`~onlinespec.decode.grammar.Structure` (its
    own grammar backend follows it; the engine's ``structured_outputs_config`` keeps free
    whitespace out of JSON)."""
    if structure is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structure.kind == "choice":
        return StructuredOutputsParams(choice=structure.texts())
    return StructuredOutputsParams(**{structure.kind: structure.spec})


def _client_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses (a 400, not a failed generation): ValueError and
    TypeError, and vLLM's own client errors (logit_bias or min_p under speculative decoding)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # a vLLM before its exception classes
        return ValueError, TypeError
    return ValueError, TypeError, VLLMClientError


def vllm_exposition() -> str:
    """vLLM's own metrics (``vllm:`` names: its spec-decode counters among them), from the
    Prometheus registry its engine writes to in this process: /metrics shows them beside ours."""
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    return "\n".join(line for line in text.splitlines() if "vllm:" in line)


def _request_logprobs(tokens: list[int], positions: list[dict], n: int | None):
    """What the request asked for: each token's log-prob and its ``n`` most likely alternatives."""
    if n is None or not positions:
        return None
    out = []
    for token, position in zip(tokens, positions):
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank)
        top = tuple((int(t), float(lp.logprob)) for t, lp in ranked if lp.rank <= n)
        out.append(TokenLogprob(int(token), float(position[token].logprob), top))
    return tuple(out)


def _topk(positions: list[dict], k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's per-position log-probs as the record's [G, K] ids and log-probs (the ``k`` best by
    rank; vLLM adds the sampled token beside them when it ranks lower, which is left out)."""
    ids = np.zeros((len(positions), k), np.int32)
    lps = np.full((len(positions), k), -1e4, np.float32)
    for i, position in enumerate(positions):
        for t, lp in position.items():
            if 1 <= lp.rank <= k:
                ids[i, lp.rank - 1] = t
                lps[i, lp.rank - 1] = max(lp.logprob, -1e4)
    return ids, lps


def feedback_record(handle: RequestHandle, gen: VllmGeneration, draft_log, target_id: str, k: int):
    """The request's feedback record (the embedded engine's, field for field) and how many generated
    positions the proposer's log did not cover (recorded as plain target steps)."""
    ids, lps = _topk(gen.logprobs, k)
    drafter = gen.drafter
    builder = RecordBuilder(list(handle.prompt), target_id,
                            drafter.drafter_id if drafter is not None else "none",
                            draft_log.drafter_version if draft_log is not None else 0,
                            handle.params.as_record(), tenant=handle.tenant, domain=handle.domain)
    total, at = len(gen.tokens), 0
    # positions before the proposer's first block (a request whose assignment reached a proposer in
    # another process after vLLM's first step) are plain target steps
    first = draft_log.start - len(handle.prompt) if draft_log is not None and draft_log.start is not None else 0
    while at < min(first, total):
        builder.add_block(ids[at:at + 1], lps[at:at + 1], [], 0, 1)
        at += 1
    for drafts, emitted, accepted in (draft_log.blocks if draft_log is not None else []):
        if at >= total:
            break
        n = min(emitted, total - at)  # vLLM cut the last block at a stop or max_tokens
        builder.add_block(ids[at:at + n], lps[at:at + n], drafts, accepted, n)
        at += n
    gaps = total - at + min(max(first, 0), total)
    while at < total:
        builder.add_block(ids[at:at + 1], lps[at:at + 1], [], 0, 1)
        at += 1
    return builder.build(gen.tokens), gaps
