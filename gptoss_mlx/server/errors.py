"""OpenAI's error envelope, and how our errors map onto it.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with the HTTP status
OpenAI would use: 400 bad request (the field named in `param`), 401 bad key, 404 unknown model or
stored response, 413 body too large, 500 a failure of this request only, 503 the queue is full
(with Retry-After). Messages are one line; a traceback never reaches a client (unexpected
exceptions are logged here and answered with a generic 500).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GptOssError, UsageError

log = logging.getLogger("gptoss_mlx.server")

# "messages[2].role: unknown role" / "temperature: must be in ..." -> the field before the colon.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*)(?::| must )")


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, request: Request | None = None) -> JSONResponse:
        """The JSON response; with `request`, also the request's one log line."""
        if request is not None:
            log.info(
                "%s %s %d %s: %s",
                request.method,
                request.url.path,
                self.status,
                self.code or self.type,
                self.message[:300],
            )
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


def unsupported(param: str, why: str) -> APIError:
    """A parameter we do not implement, refused rather than silently ignored."""
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def field_of(message: str) -> str | None:
    """The field a one-line error message starts with (`messages[2].role: ...`), if any."""
    m = _FIELD_PREFIX.match(message)
    return m.group(1) if m else None


def from_gptoss_error(e: GptOssError) -> APIError:
    """Map an error of the library (or the engine) onto an HTTP error."""
    from ..engine.generate import ContextLimitError, NonFiniteLogitsError
    from ..engine.scheduler import Busy, ContextLengthExceeded

    message = str(e)
    if isinstance(e, ContextLengthExceeded | ContextLimitError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(e, Busy):
        return APIError(
            503,
            f"{message} (the server is at --max-concurrency with a full --max-queue; retry)",
            type="server_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, NonFiniteLogitsError):
        return APIError(500, message, type="server_error", code="non_finite_logits")
    if isinstance(e, UsageError):
        return bad_request(message, param=field_of(message))
    return APIError(500, message, type="server_error", code="engine_error")


# Parts of a pydantic error location that name a member of a union type, not a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _loc(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role" (union member tags dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            break  # e.g. ("input", "str"): the field is `input`, "str" a union member
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    loc = _loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})",
            None,
        )
    if kind == "extra_forbidden":
        return f"{loc}: unsupported parameter (gptoss-mlx does not implement it)", loc
    if kind == "missing":
        return f"{loc}: required", loc
    msg = err.get("msg", "invalid value")
    return (f"{loc}: {msg}" if loc else f"body: {msg}"), (loc or None)


def install_error_handlers(app: FastAPI) -> None:
    """One place turns every failure into the envelope (the routes only raise)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response(request)

    @app.exception_handler(GptOssError)
    async def _ours(request: Request, e: GptOssError) -> JSONResponse:
        return from_gptoss_error(e).response(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        code = (
            "unsupported_parameter"
            if errors and errors[0].get("type") == "extra_forbidden"
            else "invalid_value"
        )
        if errors and errors[0].get("type") == "json_invalid":
            code = "invalid_json"
        return APIError(400, message, param=param, code=code).response(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        detail = e.detail if isinstance(e.detail, str) else "error"
        if e.status_code == 404:
            detail = "no such endpoint (this server has /v1/models, /v1/chat/completions, /v1/responses, /health)"
        err = APIError(e.status_code, detail, code=codes.get(e.status_code))
        err.headers = dict(e.headers or {})
        return err.response(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(
            500,
            "internal server error (see the server log)",
            type="server_error",
            code="internal_error",
        ).response()
