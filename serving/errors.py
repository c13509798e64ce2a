"""Errors as OpenAI-style JSON bodies: every failure a client sees, validation and bugs included."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.protocol import error_body

__all__ = ["ApiError", "install_error_handlers"]

log = logging.getLogger("serving.app")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):  # a bug: still an OpenAI-style JSON body, never plain text
        log.error("unhandled error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log",
                                       "server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return JSONResponse(error_body("; ".join(parts), param=param), status_code=400)
