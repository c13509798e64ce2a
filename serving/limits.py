"""A bound on request bodies: no client makes the server hold (and tokenize) an unbounded body
before any check. A body over ``serving.max_request_bytes`` gets a 413 with an OpenAI-style body:
at once when its Content-Length says so, else as soon as the bytes read pass the bound."""

from __future__ import annotations

import json

from fastapi import HTTPException

from serving.protocol import error_body

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: refuses HTTP request bodies over ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.message = f"request body over this server's limit of {max_bytes} bytes (serving.max_request_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send)
        seen = 0

        async def bounded():  # a chunked body, or one longer than it said
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.message)  # FastAPI passes it on while reading the body
            return message

        await self.app(scope, bounded, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(self.message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
