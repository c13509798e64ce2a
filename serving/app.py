"""The HTTP application, built from small pieces: the OpenAI routes (``openai_api.py``), the
operations routes (``ops.py``), error bodies (``errors.py``); ``serving/__main__.py`` adds the
admin and dashboard routers. A lifespan stops what the server owns when it shuts down."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from onlinespec.decode.chat import DEFAULT_CHAT_TEMPLATE
from serving.auth import bearer_token, secret_in, tenant_of
from serving.engine_loop import EngineLoop
from serving.errors import ApiError, install_error_handlers
from serving.limits import BodyLimit
from serving.metrics import Metrics
from serving.openai_api import openai_router
from serving.ops import ops_router

__all__ = ["ServerState", "create_app", "DEFAULT_CHAT_TEMPLATE", "ApiError", "bearer_token", "secret_in",
           "tenant_of"]


@dataclass
class ServerState:
    loop: EngineLoop
    tokenizer: object
    model_name: str
    metrics: Metrics
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    max_request_bytes: int = 8 << 20  # request bodies beyond get a 413 before they are read whole
    max_requests_per_tenant: int | None = None  # a tenant's requests in flight beyond get 429 (None: no cap)
    context: int | None = None  # the models' context in tokens, where known (a chat's default max_tokens fits it)
    redis: object | None = None  # None: feedback logging explicitly disabled
    # Keys accepted on /v1 (serving.api_keys or ONLINESPEC_API_KEYS); empty: any key is accepted.
    api_keys: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def create_app(state: ServerState, on_shutdown=()) -> FastAPI:
    """The application for a server state; ``on_shutdown``: what to call when it stops (the
    owners' ``stop``/``close`` of the engine loop, the watcher, the writer, the sampler)."""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        for stop in on_shutdown:
            stop()

    app = FastAPI(title="OnlineSpec", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=state.max_request_bytes)
    install_error_handlers(app)
    app.include_router(openai_router(state))
    app.include_router(ops_router(state))
    return app
