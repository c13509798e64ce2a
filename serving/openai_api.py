"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions (streamed or not) and
/v1/models. A request is checked (model, limits, API key) before any work, submitted to the
engine loop, and answered with the OpenAI body plus ``speculative``: what the drafters and
suffix copies contributed to it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError

from onlinespec.decode.chat import render
from onlinespec.decode.engine import TokenLogprob
from onlinespec.errors import InvalidRequestError
from onlinespec.decode.sampling import SamplingParams
from serving.auth import bearer_token, secret_in, tenant_of
from serving.choices import ClientGone, outputs, speculative, usage
from serving.engine_loop import QueueFull, RequestHandle
from serving.errors import ApiError
from serving.logprobs import chat_logprobs, completion_logprobs
from serving.protocol import (MAX_SEED, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body,
                              new_id, now)
from serving.tenants import TenantBusy, TenantLimit

__all__ = ["openai_router"]


def openai_router(state) -> APIRouter:
    router = APIRouter()
    tenants = TenantLimit(state.max_requests_per_tenant)  # what each tenant has in flight (the event loop's)

    def _known_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")

    async def _prediction(req) -> tuple[int, ...]:
        """The token ids of the request's predicted output (tokenized in a thread), at most
        ``max_tokens`` of the server's: no answer is longer."""
        if req.prediction is None or not req.prediction.content:
            return ()
        ids = await asyncio.to_thread(state.tokenizer.encode, req.prediction.content, add_special_tokens=False)
        if len(ids) > state.max_tokens:
            raise ApiError(400, f"prediction has {len(ids)} tokens, more than this server's max_tokens of "
                           f"{state.max_tokens}: no answer is that long", param="prediction")
        return tuple(ids)

    def _params(req, prompt_len: int) -> SamplingParams:
        _known_model(req.model)
        if prompt_len > state.max_prompt_tokens:
            raise ApiError(400, f"prompt has {prompt_len} tokens, more than this server's limit of "
                           f"{state.max_prompt_tokens}", param="prompt")
        max_new = req.max_completion_tokens or req.max_tokens or _default_max_tokens(req, prompt_len)
        if max_new > state.max_tokens:
            raise ApiError(400, f"max_tokens={max_new} exceeds this server's limit of {state.max_tokens}",
                           param="max_tokens")
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=tuple(req.stop or ()),
                                  allowed_token_ids=tuple(dict.fromkeys(req.allowed_token_ids or ())),
                                  stop_token_ids=tuple(req.stop_token_ids or ()), k=req.k,
                                  ignore_eos=req.ignore_eos, logprobs=req.logprobs_wanted,
                                  frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                  repetition_penalty=req.repetition_penalty, logit_bias=req.bias_pairs,
                                  min_tokens=req.min_tokens,
                                  structure=req.structure,
                                  prompt_logprobs=req.logprobs if getattr(req, "echo", False) else None)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc)) from None

    def _default_max_tokens(req, prompt_len: int) -> int:
        """What a request that names no max_tokens gets: 16 for a completion (OpenAI's and vLLM's
        default); a chat answer may run to the server's limit, within the models' context (as
        vLLM's chat endpoint lets it run to the context's end)."""
        if not isinstance(req, ChatRequest):
            return 16
        room = state.context - prompt_len if state.context is not None else state.max_tokens
        return max(1, min(state.max_tokens, room))

    def _key(request: Request) -> str | None:
        """The request's API key, refused (401) unless it is one the server accepts."""
        key = bearer_token(request.headers.get("authorization"))
        if state.api_keys and not secret_in(key, state.api_keys):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           type_="authentication_error", code="invalid_api_key")
        return key

    def _tenant(req, request: Request) -> str | None:
        return tenant_of(_key(request), req.user)

    def _choices(req, params: SamplingParams, prompts: int = 1) -> list[SamplingParams]:
        """One request per choice (``n``) of each of ``prompts``: with a seed, choice ``i`` samples
        with seed + i, as vLLM seeds its child requests."""
        if req.n * prompts > state.loop.max_queue:
            what = f"n={req.n}" if prompts == 1 else f"{prompts} prompts x n={req.n}"
            raise ApiError(400, f"{what} exceeds this server's queue of {state.loop.max_queue} requests",
                           param="n")
        if req.n == 1:
            return [params]
        if params.seed is not None and params.seed + req.n - 1 > MAX_SEED:
            raise ApiError(400, f"seed + n - 1 must be at most {MAX_SEED} (choice i samples with seed + i)",
                           param="seed")
        return [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(req.n)]

    def _submit(requests: list[tuple[list[int], SamplingParams]], tenant: str | None, domain: str | None = None,
                stream: bool = True, cache_salt: str | None = None) -> list[RequestHandle]:
        try:
            tenants.check(tenant, len(requests))
        except TenantBusy as exc:
            state.metrics.rejected.inc(label="tenant_limit")
            raise ApiError(429, str(exc), type_="rate_limit_error") from None
        except ValueError as exc:  # more than one client may have at all
            raise ApiError(400, str(exc), param="n") from None
        try:
            handles = state.loop.submit_all(requests, tenant=tenant, domain=domain, stream=stream,
                                            cache_salt=cache_salt)
        except QueueFull as exc:
            state.metrics.rejected.inc(label="queue_full")
            raise ApiError(429, f"server busy: {exc}; retry later", type_="rate_limit_error") from None
        tenants.track(tenant, handles)
        return handles

    def _logprobs(kind: str, items, wanted: bool, text_offset: int = 0) -> dict | None:
        if not wanted:
            return None
        if kind == "completion":
            return completion_logprobs(state.tokenizer, items, text_offset)
        return chat_logprobs(state.tokenizer, items)

    def _echoed(handle: RequestHandle, echo: str | None, wanted: bool) -> tuple[str, list[TokenLogprob]]:
        """What an echoed completion starts with: the prompt's text, and (with logprobs) its
        tokens' log-probs, the first token's None."""
        if echo is None:
            return "", []
        if not wanted:
            return echo, []
        return echo, [TokenLogprob(handle.prompt[0], None), *handle.generation.prompt_logprobs]

    def _stream(handles, request, kind: str, rid: str, prompt_len: int, include_usage: bool, wanted: bool,
                echo: list[str] | None = None, per: int = 1):
        created = now()
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def chunk(index, delta_text, finish, first=False, logprobs=None):
            if kind == "completion":
                choice = {"index": index, "text": delta_text, "logprobs": logprobs, "finish_reason": finish}
            else:
                delta = {"content": delta_text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice]}

        async def events():
            n = len(handles)
            completion, chars, first = 0, [0] * n, [True] * n
            pending = [[] for _ in handles]  # log-probs of tokens whose text is held back (a possible stop string)
            try:
                async for i, out in outputs(handles, request):
                    completion += len(out.tokens)
                    text = out.text
                    if first[i]:  # an echoed prompt comes first
                        text, pending[i] = _echoed(handles[i], echo[i] if echo else None, wanted)
                        text += out.text
                    pending[i] += out.logprobs or ()
                    finish = out.finish_reason.value if out.finished else None
                    if text or finish or first[i]:
                        lp = _logprobs(kind, pending[i], wanted, chars[i])
                        yield f"data: {json.dumps(chunk(i, text, finish, first[i], lp))}\n\n"
                        chars[i] += len(text)
                        pending[i] = []
                        first[i] = False
                if include_usage:
                    tail = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [],
                            "usage": usage(handles, prompt_len, completion, per), "speculative": speculative(handles)}
                    yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
            except ClientGone:
                return  # nobody reads on
            except ApiError as exc:  # found after the 200: an error event, then the end (as vLLM)
                yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for handle in handles:
                    handle.cancel()  # a no-op when finished; frees the engine when the client left

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _serve(req, prompts: list[list[int]], request: Request, kind: str, tenant: str | None,
                     echoes: list[str] | None = None):
        """``n`` choices for each of ``prompts``, in that order (OpenAI's ``index``); ``echoes``:
        each prompt's text, put before its choices' completions."""
        params = _params(req, max(map(len, prompts)))  # the longest prompt within the limits: every one is
        prediction = await _prediction(req)
        if prediction:
            params = replace(params, prediction=prediction)
        if params.structure is not None:
            try:  # its grammar is compiled in a thread, not in the engine loop
                await asyncio.to_thread(state.loop.prepare, params)
            except InvalidRequestError as exc:
                raise ApiError(400, str(exc), param="response_format") from None
        each = _choices(req, params, len(prompts))  # the sampling of each prompt's n choices
        try:  # what the engine would refuse when it starts them: refused now, before a stream's 200
            for p in prompts:
                state.loop.check(p, params)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc)) from None
        handles = _submit([(p, c) for p in prompts for c in each], tenant, req.domain, stream=bool(req.stream),
                          cache_salt=req.cache_salt)
        echo = [e for e in echoes for _ in each] if echoes else None  # each handle's
        prompt_len, per = sum(map(len, prompts)), len(each)
        rid = new_id("cmpl" if kind == "completion" else "chatcmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wanted = params.logprobs is not None
        if req.stream:
            return _stream(handles, request, kind, rid, prompt_len, include_usage, wanted, echo, per)
        n = len(handles)
        texts, tokens, items, finish = [[] for _ in handles], [0] * n, [[] for _ in handles], [None] * n
        try:
            async for i, out in outputs(handles, request):
                texts[i].append(out.text)
                tokens[i] += len(out.tokens)
                items[i] += out.logprobs or ()
                if out.finished:
                    finish[i] = out.finish_reason.value
        except ClientGone:  # its requests are cancelled; what nginx logs as 499, for the access log alone
            return Response(status_code=499)
        finally:
            for handle in handles:
                handle.cancel()
        choices = []
        for i in range(n):
            start, scored = _echoed(handles[i], echo[i] if echo else None, wanted)
            # log-probs name every token and its alternatives as text: built off the event loop
            logprobs = await asyncio.to_thread(_logprobs, kind, scored + items[i], wanted) if wanted else None
            text = start + "".join(texts[i])
            if kind == "completion":
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                "finish_reason": finish[i]})
        obj = "text_completion" if kind == "completion" else "chat.completion"
        return {"id": rid, "object": obj, "created": now(), "model": state.model_name, "choices": choices,
                "usage": usage(handles, prompt_len, sum(tokens), per), "speculative": speculative(handles)}

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        tenant = _tenant(req, request)  # a bad key is refused before any work
        prompts, echoes = [], []
        for one in req.prompts:
            # text is tokenized in a thread (Hugging Face's tokenizers let go of the GIL): a long
            # prompt does not hold the event loop, which streams every other request's tokens
            ids = list(one) if isinstance(one, list) else await asyncio.to_thread(state.tokenizer.encode, one)
            if not ids:
                raise ApiError(400, "prompt encodes to no tokens", param="prompt")
            prompts.append(ids)
            if req.echo:  # echoed as it was sent (token ids: as they decode)
                echoes.append(one if isinstance(one, str) else await asyncio.to_thread(state.tokenizer.decode, ids))
        return await _serve(req, prompts, request, "completion", tenant, echoes if req.echo else None)

    async def _render(req) -> list[int]:
        """A chat's prompt ids through the model's chat template (in a thread: a long chat is
        tokenized off the event loop). A template may refuse a conversation (many raise on roles
        that do not alternate, or on a system message), and transformers refuses to continue a
        final message the template does not render as sent: a 400 that says why."""
        try:
            return await asyncio.to_thread(render, state.tokenizer, [m.model_dump() for m in req.messages],
                                           **req.render_options)
        except (TemplateError, ValueError) as exc:
            raise ApiError(400, f"the model's chat template refused these messages: {exc}",
                           param="messages") from None

    @router.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tenant = _tenant(req, request)
        return await _serve(req, [await _render(req)], request, "chat", tenant)

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request):
        """vLLM's: the token ids a prompt (or a chat, rendered as the chat route renders it) is
        served as, with the server's limit on them. The API key, where keys are configured, as on /v1."""
        _key(request)
        _known_model(req.model)
        if req.messages is not None:
            ids = await _render(req)
        else:
            ids = await asyncio.to_thread(state.tokenizer.encode, req.prompt)
        return {"count": len(ids), "max_model_len": state.context, "max_prompt_tokens": state.max_prompt_tokens,
                "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request):
        _key(request)
        _known_model(req.model)
        vocab = len(state.tokenizer)
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"token ids out of the tokenizer's range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": await asyncio.to_thread(state.tokenizer.decode, req.tokens)}

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "onlinespec"}]}

    return router
