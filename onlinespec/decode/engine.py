"""The speculative decoding engine: propose, verify, accept, rewind.

One :class:`Generation` per request: its tokens, stop state, randomness, statistics and feedback
record. Steps are taken by a :class:`~onlinespec.decode.batch.Batch`, for every request it holds in
one target forward:

1. ``propose``: copies and the drafter's drafts, ``k`` after the settled sequence (k = 0: plain);
2. ``verify``: the target encodes the last settled token and the drafts, ``k + 1`` positions,
   in one pass over its KV cache;
3. ``accept`` (:meth:`Generation.settle`): the rejection rule keeps a prefix of the drafts and
   adds the target's own token, through the stop rules, into the feedback record;
4. ``rewind``: the caches drop the rejected positions (never re-encoding the prefix).

The target's cache always holds every settled token but the last, which is fed with the next
step's drafts. :meth:`Generation.step` steps one request alone (a batch of one); every step
reports what it emitted so a server can stream.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from transformers import PreTrainedModel

from onlinespec.cpu_linear import use_small_batch_linears
from onlinespec.decode.adaptive import BatchK
from onlinespec.drafters.base import Drafter, Proposal
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import InvalidRequestError
from onlinespec.feedback.codec import CapturedFeatures
from onlinespec.feedback.record import FeedbackRecord, RecordBuilder
from onlinespec.models import check_same_vocab, vocab_size
from onlinespec.decode.sampling import PositionNoise, SamplingParams, penalize
from onlinespec.decode.stops import FinishReason, StopState
from onlinespec.decode.prediction import Prediction
from onlinespec.decode.suffix import RequestIndex, SuffixCache
from onlinespec.decode.verify import verify, verify_coupled

__all__ = ["EngineConfig", "SpeculativeEngine", "Generation", "check_request", "StepOutput", "TokenLogprob",
           "GenerationResult", "GenerationStats"]

@dataclass(frozen=True)
class EngineConfig:
    # Default draft length; None lets BatchK choose per step from measured acceptance and costs.
    k: int | None = None
    k_max: int = 8  # bound for the adaptive controller (and the longest block we ever verify)
    # Top-K of the target's log-probs kept per generated position: losses use K + 1 buckets.
    feedback_topk: int = 32
    capture_feedback: bool = True
    target_id: str = "target"
    # Tokens of a request's text (its last) a drafter model encodes when it first drafts for it
    # (None: all, the default). Encoding is paid once per request and drafter; under load it was 3-5% of the
    # bundled pair's time, and a small drafter's drafts barely use distant context.
    drafter_context: int | None = None
    # Share of requests (with feedback on) whose target features are kept and handed out with
    # their record (:meth:`Generation.captured_features`): what a feature drafter's learners
    # learn from. Features of the generated tokens and of the last ``feature_window`` prompt tokens.
    capture_features: float = 0.0
    feature_window: int = 64

    def __post_init__(self):
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise InvalidRequestError(f"k (draft length) must be an integer >= 1, got {self.k!r}")
        assert self.k_max >= 1, "k_max must be >= 1"
        assert self.feedback_topk >= 1, "feedback_topk must be >= 1"
        assert self.drafter_context is None or self.drafter_context >= 1, "drafter_context must be >= 1 or None"
        assert 0.0 <= self.capture_features <= 1.0, "capture_features is a share in [0, 1]"
        assert self.feature_window >= 0, "feature_window must be >= 0"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the target (raw log-softmax) and the ``n`` most likely
    tokens at that position (``top``: (id, log-prob), most likely first). ``logprob`` None: a
    prompt's first token, which nothing before it predicts."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class OwnDrafts:
    """The drafter model's own drafts, apart from suffix copies, of anything that counts
    ``drafted``, ``accepted``, ``copied`` and ``copied_accepted``."""

    @property
    def own_drafted(self) -> int:
        return self.drafted - self.copied

    @property
    def own_accepted(self) -> int:
        return self.accepted - self.copied_accepted


@dataclass(frozen=True)
class StepOutput(OwnDrafts):
    tokens: list[int]  # emitted this step (after stop handling)
    text: str  # text safe to show that was not shown before ("" without a tokenizer)
    drafted: int  # drafts proposed this step
    accepted: int  # of which the target accepted
    finished: bool
    finish_reason: FinishReason | None
    copied: int = 0  # of the drafts, copied by suffix speculation rather than drafted by the drafter
    copied_accepted: int = 0  # of the accepted drafts, copied ones
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked for them
    predicted: int = 0  # of the copied drafts, those from the request's predicted output
    predicted_accepted: int = 0  # of which accepted


@dataclass
class GenerationStats(OwnDrafts):
    steps: int = 0  # target forwards after prefill
    spec_steps: int = 0  # steps that verified at least one draft
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # speculative steps that stopped short of their drafts
    # accepted_hist[n]: speculative steps that accepted n drafts (gpt-fast's main statistic)
    accepted_hist: list[int] = field(default_factory=list)
    # accepted_per_pos[i]: steps whose i-th draft was accepted (vLLM's per-position counter)
    accepted_per_pos: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    copied: int = 0  # drafts copied by suffix speculation (included in drafted)
    copied_accepted: int = 0  # of which accepted (included in accepted)
    capture_seconds: float = 0.0  # copying the target's top-K into the feedback record
    own_steps: int = 0  # speculative steps with at least one draft of the drafter model's own
    copy_steps: int = 0  # speculative steps with at least one copy
    # the drafter model's own drafts the target judged on its own text: those up to a block's first
    # rejection, that one included (a draft after a rejected one follows a wrong token). Its own
    # accepted drafts per judged one are its acceptance per position, the figure its learners
    # measure teacher-forced (own accepted / own drafted is lower: drafts past a rejection count)
    own_judged: int = 0
    predicted: int = 0  # of the copies, those from the request's predicted output
    predicted_accepted: int = 0  # of which accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per speculative step: accepted drafts plus the target's own token."""
        return (self.accepted + self.spec_steps) / self.spec_steps if self.spec_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def own_accepted_length(self) -> float | None:
        """The drafter model's own accepted drafts per step it drafted in, plus the target's token."""
        return 1.0 + self.own_accepted / self.own_steps if self.own_steps else None

    @property
    def own_position_acceptance(self) -> float | None:
        """The drafter model's own accepted drafts per own draft judged (:attr:`own_judged`)."""
        return self.own_accepted / self.own_judged if self.own_judged else None

    @property
    def copied_accepted_length(self) -> float | None:
        """The same for suffix copies."""
        return 1.0 + self.copied_accepted / self.copy_steps if self.copy_steps else None

    def add(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.steps += 1
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s
        if drafted == 0:
            return
        self.spec_steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += accepted < drafted
        while len(self.accepted_hist) <= drafted:
            self.accepted_hist.append(0)
        while len(self.accepted_per_pos) < drafted:
            self.accepted_per_pos.append(0)
        self.accepted_hist[accepted] += 1
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    @classmethod
    def combine(cls, many) -> GenerationStats:
        """The stats of several generations taken together (counts and histograms summed)."""
        total = cls()
        for s in many:
            for f in fields(cls):
                mine, theirs = getattr(total, f.name), getattr(s, f.name)
                if isinstance(mine, list):  # histograms: summed position by position
                    mine.extend([0] * (len(theirs) - len(mine)))
                    for i, v in enumerate(theirs):
                        mine[i] += v
                else:
                    setattr(total, f.name, mine + theirs)
        return total


@dataclass(frozen=True)
class GenerationResult:
    prompt: list[int]
    tokens: list[int]  # generated, stop token included when it was EOS or a stop id
    text: str
    finish_reason: FinishReason
    stats: GenerationStats
    record: FeedbackRecord | None


def _token_logprobs(lp: torch.Tensor, tokens: list[int], n: int) -> tuple[TokenLogprob, ...]:
    """lp: [T, V] log-softmax at the positions that produced ``tokens`` (T of them)."""
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if n:
        top = lp.topk(n, dim=-1)
        alts = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        alts = [()] * len(tokens)
    return tuple(TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts))


def _max_positions(model: PreTrainedModel | None) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


class SpeculativeEngine:
    """Target + drafter, shared by every request. Not thread-safe: one engine loop drives it."""

    def __init__(
        self,
        target: PreTrainedModel,
        drafter: Drafter | HFDrafter | None = None,
        tokenizer=None,
        config: EngineConfig = EngineConfig(),
        eos_token_ids: set[int] | None = None,
        suffix: SuffixCache | None = None,
    ):
        """``suffix``: copy drafts from the request's own text and from past outputs (this cache,
        which learns every finished request's output) wherever the suffix matches."""
        self.target = use_small_batch_linears(target.eval())  # decode and verify steps: a few rows each
        self.suffix = suffix
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = vocab_size(target)
        if eos_token_ids is None:
            eos = getattr(target.generation_config, "eos_token_id", None) or target.config.eos_token_id
            eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_token_ids = frozenset(eos_token_ids)
        # the draft-length controller: costs per batch size, acceptance per proposer; kept for the
        # engine's life, whichever batch steps its requests
        self.k_controller = BatchK(k_max=config.k_max)
        self._structured = None  # llguidance's view of the tokenizer, built for the first response_format
        self.drafter: Drafter | HFDrafter | None = None
        if drafter is not None:
            self.set_drafter(drafter)

    def set_drafter(self, drafter: Drafter | HFDrafter | None) -> None:
        """Draft with another drafter for requests that start from now (requests in flight keep
        theirs: their drafter keys are its)."""
        if drafter is not None:
            check_same_vocab(self.config.target_id, self.vocab_size, drafter.drafter_id, drafter.vocab_size)
        self.drafter = drafter

    def structured(self):
        """What compiles a request's structured output (:mod:`onlinespec.decode.grammar`)."""
        if self._structured is None:
            from onlinespec.decode.grammar import Structured

            self._structured = Structured(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._structured

    def check(self, prompt: list[int], params: SamplingParams) -> int | None:
        """:func:`check_request` with this engine's vocabulary, context, ``k_max`` and EOS ids
        (for a request it starts, and for the server before queueing one); returns the context."""
        limit = self.max_context()
        check_request(prompt, params, self.vocab_size, limit, self.config.k_max, self.eos_token_ids)
        return limit

    def max_context(self) -> int | None:
        limits = [_max_positions(self.target), _max_positions(getattr(self.drafter, "model", None))]
        limits = [x for x in limits if x]
        return min(limits) if limits else None

    def start(
        self,
        prompt: list[int],
        params: SamplingParams = SamplingParams(),
        request_id: str | None = None,
        tenant: str | None = None,
        isolated: bool = False,
        coupled: bool | None = None,
        drafter: Drafter | HFDrafter | None | str = "default",
        domain: str | None = None,
    ) -> Generation:
        """``tenant`` scopes suffix speculation's past outputs (with ``scope: tenant``);
        ``isolated``: copy only from this request's own text, and keep nothing of its output;
        ``coupled`` (default: when the request samples with a seed): draw each token with noise
        fixed by the seed and its position (:class:`~onlinespec.decode.sampling.PositionNoise`), so the
        text does not depend on the drafts, the draft length or the batch; otherwise sampled
        requests are verified by rejection sampling (a higher acceptance, a text that depends
        on the drafts). ``drafter``: the one that drafts for this request (default: the
        engine's; None: suffix speculation only); ``domain``: the request's declared traffic group,
        kept in its feedback record."""
        if drafter == "default":
            drafter = self.drafter
        elif drafter is not None and drafter is not self.drafter:
            check_same_vocab(self.config.target_id, self.vocab_size, drafter.drafter_id, drafter.vocab_size)
        return Generation(self, prompt, params, request_id, tenant, isolated, coupled, drafter, domain)

    def stream(self, prompt: list[int], params: SamplingParams = SamplingParams()) -> Iterator[StepOutput]:
        gen = self.start(prompt, params)
        while not gen.finished:
            yield gen.step()

    def generate(self, prompt: list[int], params: SamplingParams = SamplingParams(), **kw) -> GenerationResult:
        gen = self.start(prompt, params, **kw)
        while not gen.finished:
            gen.step()
        return gen.result()


def check_request(prompt: list[int], params: SamplingParams, vocab_size: int, context: int | None,
                  k_max: int | None, eos_ids: frozenset[int] = frozenset()) -> None:
    """Refuse (:class:`InvalidRequestError`) a request an engine cannot serve: an empty prompt,
    token ids outside its ``vocab_size`` (the prompt's, ``logit_bias``', ``stop_token_ids``',
    ``allowed_token_ids``', the prediction's), a
    prompt and ``max_new_tokens`` past its ``context`` (None: unbounded), ``k`` past ``k_max``
    (None: any), ``allowed_token_ids`` that ``min_tokens`` would leave empty (every one an EOS
    in ``eos_ids`` or a stop token id). The server calls it before queueing too, so a streamed
    request is refused with a 400, not an error event after its 200."""
    if not prompt:
        raise InvalidRequestError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids),
                      ("allowed_token_ids", params.allowed_token_ids), ("prediction", params.prediction)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequestError(f"{name} token ids out of range [0, {vocab_size}): {bad[:5]}")
    if context is not None and len(prompt) + params.max_new_tokens > context:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"models' context of {context} tokens"
        )
    if params.k is not None and k_max is not None and params.k > k_max:
        raise InvalidRequestError(f"k={params.k} exceeds this engine's k_max={k_max}")
    if params.allowed_token_ids and params.min_tokens and set(params.allowed_token_ids) <= (
            set(eos_ids) | set(params.stop_token_ids)):
        raise InvalidRequestError("allowed_token_ids holds only tokens that end the text, which min_tokens holds "
                                  "back: no token could come")


class Generation:
    """One request in flight: its caches, stop state, statistics and feedback."""

    def __init__(self, engine: SpeculativeEngine, prompt, params: SamplingParams, request_id, tenant,
                 isolated: bool = False, coupled: bool | None = None, drafter: Drafter | HFDrafter | None = None,
                 domain: str | None = None):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        prompt = [int(t) for t in prompt]
        limit = engine.check(prompt, params)
        self.engine = engine
        self.params = params
        self.prompt = prompt
        self.tokens = list(prompt)
        self.limit = limit
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.coupled = (params.seed is not None if coupled is None else coupled) and not params.greedy
        # what every draw of this request takes its randomness from (drafts and verification)
        self.generator: torch.Generator | PositionNoise = (
            PositionNoise(seed, engine.vocab_size) if self.coupled else torch.Generator().manual_seed(seed))
        self.stop = StopState(params, engine.eos_token_ids, engine.tokenizer)
        # with structured output: the matcher of its structure, which has read the generated tokens
        self.grammar = engine.structured().start(params.structure) if params.structure is not None else None
        self.stats = GenerationStats()
        self._alone = None  # the batch of one that step() uses
        self.drafter = drafter
        # per-request state of a drafter driven through the Drafter contract (HFDrafter rows live
        # in the batch)
        self.dstate = self.drafter.begin(prompt) if isinstance(self.drafter, Drafter) else None
        # the target's features of the settled tokens, kept (by the batch) when the drafter reads
        # them or the request is captured for learning
        self.features = None
        share = engine.config.capture_features
        self.capture = engine.config.capture_feedback and share > 0 and (share >= 1 or random.random() < share)
        suffix = engine.suffix
        self.index = RequestIndex(suffix.config) if suffix is not None else None
        # the client's predicted output, drafted from where the answer follows it
        self.prediction = Prediction(params.prediction) if params.prediction else None
        # Past outputs are copied within the request's tenant, or across all requests with scope
        # "shared"; an isolated request copies only from its own text and leaves nothing behind.
        self.cache = None if isolated else suffix
        self.isolated = isolated
        self.tenant = tenant
        # with ``params.prompt_logprobs``: the prompt's tokens from the second on, scored as the batch reads them
        self.prompt_logprobs: list[TokenLogprob] = []
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the batch's prefix cache
        self.cache_salt: str | None = None  # the prefix cache serves it only what requests with this salt left
        self.scope = suffix.config.scope_of(tenant) if suffix is not None else None
        self.builder = (
            RecordBuilder(
                prompt=list(prompt),
                target_id=engine.config.target_id,
                drafter_id=self.drafter.drafter_id if self.drafter else "none",
                drafter_version=self.drafter.version if self.drafter else 0,
                sampling=params.as_record(),
                tenant=tenant,
                domain=domain,
                **({"request_id": request_id} if request_id else {}),
            )
            if engine.config.capture_feedback
            else None
        )
        self.request_id = self.builder.request_id if self.builder else (request_id or "")

    @property
    def finished(self) -> bool:
        return self.stop.finished

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    def draft_length(self, k: int | None = None) -> int:
        """Drafts to propose this step: the request's own ``k``, else the engine's fixed one, else
        ``k`` (the batch controller's choice); bounded by what is left to generate."""
        if self.drafter is None and self.index is None and self.prediction is None:
            return 0  # nothing can propose: plain decoding
        k = self.params.k or self.engine.config.k or k or 0
        remaining = self.params.max_new_tokens - len(self.generated)
        room = self.limit - len(self.tokens) if self.limit is not None else k
        # A step emits accepted + 1 tokens: drafting more than remaining - 1 is wasted work.
        return max(0, min(k, remaining - 1, room))

    @property
    def adaptive(self) -> bool:
        """Whether the controller chooses this request's draft length."""
        return self.params.k is None and self.engine.config.k is None and (
            self.drafter is not None or self.index is not None or self.prediction is not None)

    def step(self) -> StepOutput:
        """One step of this request alone (a batch of one): prefill, then propose, verify,
        accept, rewind."""
        from onlinespec.decode.batch import Batch

        assert not self.finished, "step() on a finished generation"
        if self._alone is None:
            self._alone = Batch(self.engine, slots=1, prefill_tokens=1 << 20)
            self._alone.add(self)
        while True:
            for _, out in self._alone.step():
                if isinstance(out, Exception):
                    raise out
                if self.finished:
                    self._alone = None
                return out

    def settle(self, proposal: Proposal, copied: list[bool], logits: torch.Tensor, draft_s: float,
               verify_s: float) -> StepOutput:
        """Accept what the target's ``logits`` ([m+1, V] at the last settled token and each of the
        ``m`` drafts) allow, emit it through the stop rules, record it. The caches are the caller's
        to rewind (to ``len(self.tokens) - 1``)."""
        drafts = proposal.tokens
        judged = self.judged(logits, drafts.tolist())
        if self.coupled:
            at = len(self.tokens)  # the position of the first draft
            noise = torch.stack([self.generator.at(at + i) for i in range(len(drafts) + 1)])
            verdict = verify_coupled(judged, drafts, self.params, noise)
        else:
            verdict = verify(judged, drafts, proposal.q, self.params, self.generator)
        new = drafts[: verdict.accepted].tolist() + [verdict.token]
        emitted = 0
        for token in new:
            emitted += 1
            if self.grammar is not None:
                self.grammar.advance(token)
            if self.stop.push(token) or (self.grammar is not None and self.grammar.stopped and self.stop.end()):
                break
        # the target's log-probs at the emitted positions: for the feedback record and the response
        lp = None
        if self.builder is not None or self.params.logprobs is not None:
            t_capture = time.perf_counter()
            lp = torch.log_softmax(logits[:emitted].float(), dim=-1)
            if self.builder is not None:
                self._capture(lp, drafts.tolist(), verdict.accepted, emitted)
                self.stats.capture_seconds += time.perf_counter() - t_capture
        self.tokens.extend(new[:emitted])
        if self.coupled:
            self.generator.forget(len(self.tokens))
        m = len(drafts)
        self.stats.add(m, verdict.accepted, draft_s, verify_s)
        n_copied, n_copied_accepted = sum(copied), sum(copied[: verdict.accepted])
        self.stats.copied += n_copied
        self.stats.copied_accepted += n_copied_accepted
        self.stats.copy_steps += n_copied > 0
        self.stats.own_steps += n_copied < m
        self.stats.own_judged += sum(not c for c in copied[: verdict.accepted + 1])
        n_predicted = n_predicted_accepted = 0
        if self.prediction is not None:
            n_predicted, n_predicted_accepted = self.prediction.settle(verdict.accepted)
            self.stats.predicted += n_predicted
            self.stats.predicted_accepted += n_predicted_accepted
        if self.finished and self.cache is not None:
            self.cache.add_output(self.prompt, self.generated, self.scope)
        logprobs = None
        if self.params.logprobs is not None:  # rows of the emitted positions: computed already
            logprobs = _token_logprobs(lp, new[:emitted], self.params.logprobs)
        return StepOutput(
            logprobs=logprobs,
            tokens=new[:emitted],
            text=self.stop.take_text() if self.engine.tokenizer is not None else "",
            drafted=m,
            accepted=verdict.accepted,
            copied=n_copied,
            copied_accepted=n_copied_accepted,
            predicted=n_predicted,
            predicted_accepted=n_predicted_accepted,
            finished=self.finished,
            finish_reason=self.stop.finish_reason,
        )

    def judged(self, logits: torch.Tensor, drafts: list[int], before: list[int] = ()) -> torch.Tensor:
        """Logits ``[m+1, V]`` (the target's, or a drafter's) at a block's positions after the text
        and ``before`` (drafts already in the block), then after each of the ``m`` ``drafts``, as
        the request's penalties, biases, ``min_tokens`` and structure make them: what is verified
        and what is drafted. A copy where anything changes (the raw logits stay what records log)."""
        settled = self.generated + list(before)
        out = logits
        if self.params.shapes(len(settled)):
            out = penalize(logits, self.params, self.prompt, settled, drafts, self.stop.held_ids)
        if self.grammar is not None:  # only what the structure allows after the text so far
            out = self.grammar.mask(out.float().clone() if out is logits else out, drafts, list(before))
        return out

    def score_prompt(self, logits: torch.Tensor, start: int) -> None:
        """The target's logits ``[n, V]`` at prompt positions ``start ..``: each predicts the prompt
        token after it (reading the prompt feeds all of it but its last token)."""
        if self.params.prompt_logprobs is None or not len(logits):
            return
        assert start == len(self.prompt_logprobs), "the prompt is scored in order"
        tokens = self.prompt[start + 1:start + 1 + len(logits)]
        lp = torch.log_softmax(logits.float(), dim=-1)
        self.prompt_logprobs.extend(_token_logprobs(lp, tokens, self.params.prompt_logprobs))

    def _capture(self, lp: torch.Tensor, drafts: list[int], accepted: int, emitted: int) -> None:
        """lp: [emitted, V] the target's log-softmax at the emitted positions."""
        k = min(self.engine.config.feedback_topk, lp.shape[-1])
        top = lp.topk(k, dim=-1)
        self.builder.add_block(
            top.indices.numpy().astype(np.int32), top.values.numpy().astype(np.float16), drafts, accepted, emitted
        )

    def result(self) -> GenerationResult:
        assert self.finished, "result() before the generation finished"
        return GenerationResult(
            prompt=self.prompt,
            tokens=self.generated,
            text=self.stop.text,
            finish_reason=self.stop.finish_reason,
            stats=self.stats,
            record=self.record(),
        )

    def record(self) -> FeedbackRecord | None:
        return self.builder.build(self.generated) if self.builder is not None else None

    def captured_features(self, dtype: torch.dtype = torch.float16) -> CapturedFeatures | None:
        """A captured request's target features, float16 (what is stored; a replay keeps them
        at ``dtype`` float32, as drafting read them), from ``feature_window`` tokens before
        its output to the third-last token: pair ``i`` of a feature drafter (``h_i`` with token
        ``i + 1``) predicts token ``i + 2``, so these are all the pairs that predict its output."""
        if not self.capture or self.features is None:
            return None
        start = max(0, len(self.prompt) - self.engine.config.feature_window)
        end = min(len(self.features), len(self.tokens) - 2)
        if end <= start:
            return None
        return CapturedFeatures(start, self.features[start:end].detach().to("cpu", dtype).numpy())
