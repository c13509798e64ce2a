"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions (streamed or not) and
/v1/models. A request is checked (model, limits, API key) before any work, submitted to the
engine loop, and answered with the OpenAI body plus ``speculative``: what the drafters and
suffix copies contributed to it."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from onlinespec.decode.chat import render
from onlinespec.decode.engine import StepOutput
from onlinespec.errors import InvalidRequestError
from onlinespec.decode.sampling import SamplingParams
from serving.auth import bearer_token, secret_in, tenant_of
from serving.engine_loop import QueueFull, RequestHandle
from serving.errors import ApiError
from serving.logprobs import chat_logprobs, completion_logprobs
from serving.protocol import ChatRequest, CompletionRequest, error_body, new_id, now

__all__ = ["openai_router"]


def openai_router(state) -> APIRouter:
    router = APIRouter()

    def _params(req, prompt_len: int) -> SamplingParams:
        if req.model != state.model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")
        if prompt_len > state.max_prompt_tokens:
            raise ApiError(400, f"prompt has {prompt_len} tokens, more than this server's limit of "
                           f"{state.max_prompt_tokens}", param="prompt")
        max_new = req.max_completion_tokens or req.max_tokens or 16
        if max_new > state.max_tokens:
            raise ApiError(400, f"max_tokens={max_new} exceeds this server's limit of {state.max_tokens}",
                           param="max_tokens")
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop=tuple(req.stop or ()), k=req.k,
                                  ignore_eos=req.ignore_eos, logprobs=req.logprobs_wanted,
                                  frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                  repetition_penalty=req.repetition_penalty, logit_bias=req.bias_pairs,
                                  min_tokens=req.min_tokens)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc)) from None

    def _tenant(req, request: Request) -> str | None:
        key = bearer_token(request.headers.get("authorization"))
        if state.api_keys and not secret_in(key, state.api_keys):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           type_="authentication_error", code="invalid_api_key")
        return tenant_of(key, req.user)

    def _submit(prompt_ids: list[int], params: SamplingParams, tenant: str | None,
                domain: str | None = None, stream: bool = True, cache_salt: str | None = None) -> RequestHandle:
        try:
            return state.loop.submit(prompt_ids, params, tenant=tenant, domain=domain, stream=stream,
                                     cache_salt=cache_salt)
        except QueueFull as exc:
            state.metrics.rejected.inc(label="queue_full")
            raise ApiError(429, f"server busy: {exc}; retry later", type_="rate_limit_error") from None

    def _spec(handle: RequestHandle) -> dict:
        gen = handle.generation
        drafter = gen.drafter if gen else None
        stats = gen.stats if gen else None
        return {
            "mean_accepted_length": stats.mean_accepted_length if stats else None,
            "drafted_tokens": stats.drafted if stats else 0,
            "accepted_tokens": stats.accepted if stats else 0,
            "draft_steps": stats.spec_steps if stats else 0,  # steps that verified drafts
            # drafts copied by suffix speculation (counted in drafted/accepted above)
            "copied_tokens": stats.copied if stats else 0,
            "copied_accepted_tokens": stats.copied_accepted if stats else 0,
            "drafter_id": drafter.drafter_id if drafter else None,
            "drafter_version": drafter.version if drafter else None,
            # the drafter model's own drafts and suffix copies, apart
            "own": {"drafted_tokens": stats.own_drafted if stats else 0,
                    "accepted_tokens": stats.own_accepted if stats else 0,
                    "draft_steps": stats.own_steps if stats else 0,
                    # up to each block's first rejection: accepted / judged is its acceptance per position
                    "judged_tokens": stats.own_judged if stats else 0,
                    "mean_accepted_length": stats.own_accepted_length if stats else None},
            "copied": {"drafted_tokens": stats.copied if stats else 0,
                       "accepted_tokens": stats.copied_accepted if stats else 0,
                       "draft_steps": stats.copy_steps if stats else 0,
                       "mean_accepted_length": stats.copied_accepted_length if stats else None},
        }

    def _usage(handle: RequestHandle, prompt_len: int, completion: int) -> dict:
        # OpenAI's cached_tokens: prompt tokens whose keys and values came from the prefix cache
        cached = getattr(handle.generation, "cached_tokens", 0) or 0
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _next(handle: RequestHandle, request: Request) -> StepOutput:
        while True:
            try:
                item = await asyncio.wait_for(handle.outputs.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    raise asyncio.CancelledError from None
                continue
            if isinstance(item, InvalidRequestError):
                raise ApiError(400, str(item))
            if isinstance(item, Exception):
                raise ApiError(500, f"generation failed: {item}", type_="server_error")
            return item

    async def _collect(handle, request) -> tuple[str, list[int], str, list]:
        """A request that is not streamed gets its steps' outputs in one list, at the end."""
        text, tokens, logprobs = [], [], []
        while True:
            item = await _next(handle, request)
            for out in item if isinstance(item, list) else [item]:
                text.append(out.text)
                tokens += out.tokens
                logprobs += out.logprobs or ()
                if out.finished:
                    return "".join(text), tokens, out.finish_reason.value, logprobs

    def _logprobs(kind: str, items, wanted: bool, text_offset: int = 0) -> dict | None:
        if not wanted:
            return None
        if kind == "completion":
            return completion_logprobs(state.tokenizer, items, text_offset)
        return chat_logprobs(state.tokenizer, items)

    def _stream(handle, request, kind: str, rid: str, prompt_len: int, include_usage: bool, wanted: bool):
        created = now()
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def chunk(delta_text, finish, first=False, logprobs=None):
            if kind == "completion":
                choice = {"index": 0, "text": delta_text, "logprobs": logprobs, "finish_reason": finish}
            else:
                delta = {"content": delta_text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice]}

        async def events():
            completion = chars = 0
            first = True
            pending = []  # log-probs of tokens whose text is held back (a possible stop string)
            try:
                while True:
                    out = await _next(handle, request)
                    completion += len(out.tokens)
                    pending += out.logprobs or ()
                    finish = out.finish_reason.value if out.finished else None
                    if out.text or finish or first:
                        lp = _logprobs(kind, pending, wanted, chars)
                        yield f"data: {json.dumps(chunk(out.text, finish, first, lp))}\n\n"
                        chars += len(out.text)
                        pending = []
                        first = False
                    if out.finished:
                        break
                if include_usage:
                    tail = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [],
                            "usage": _usage(handle, prompt_len, completion), "speculative": _spec(handle)}
                    yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param))}\n\n"
            finally:
                handle.cancel()  # a no-op when finished; frees the engine when the client left

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _serve(req, prompt_ids: list[int], request: Request, kind: str, tenant: str | None):
        params = _params(req, len(prompt_ids))
        handle = _submit(prompt_ids, params, tenant, req.domain, stream=bool(req.stream), cache_salt=req.cache_salt)
        rid = new_id("cmpl" if kind == "completion" else "chatcmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wanted = params.logprobs is not None
        if req.stream:
            return _stream(handle, request, kind, rid, len(prompt_ids), include_usage, wanted)
        try:
            text, tokens, finish, items = await _collect(handle, request)
        finally:
            handle.cancel()
        logprobs = _logprobs(kind, items, wanted)
        if kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
            obj = "chat.completion"
        return {"id": rid, "object": obj, "created": now(), "model": state.model_name, "choices": [choice],
                "usage": _usage(handle, len(prompt_ids), len(tokens)), "speculative": _spec(handle)}

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        tenant = _tenant(req, request)  # a bad key is refused before any work
        if isinstance(req.prompt, list):
            if any(not isinstance(t, int) or t < 0 for t in req.prompt):
                raise ApiError(400, "prompt token ids must be non-negative integers", param="prompt")
            prompt_ids = list(req.prompt)
        else:
            prompt_ids = state.tokenizer.encode(req.prompt)
        if not prompt_ids:
            raise ApiError(400, "prompt encodes to no tokens", param="prompt")
        return await _serve(req, prompt_ids, request, "completion", tenant)

    @router.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tenant = _tenant(req, request)
        prompt_ids = render(state.tokenizer, [m.model_dump() for m in req.messages])
        return await _serve(req, prompt_ids, request, "chat", tenant)

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "onlinespec"}]}

    return router
