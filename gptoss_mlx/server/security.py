"""Who may call the server, and how much they may send.

With an API key set (`--api-key` or GPTOSS_MLX_API_KEY) every endpoint but /health needs
`Authorization: Bearer KEY`; the comparison is constant-time (`hmac.compare_digest`), so response
times do not reveal how much of a guessed key was right. The body limit is an ASGI middleware so
that an oversized body is refused while it arrives, before anything parses it.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, log

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a 128k-token conversation is a few MB of JSON


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the server's key (if it has one)."""
    key: str | None = request.app.state.server.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(
            401,
            "missing API key: send `Authorization: Bearer KEY` (the key given to --api-key)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401,
            "incorrect API key (it must equal the server's --api-key)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class BodySizeLimit:
    """Answer 413 in OpenAI's envelope when a request body exceeds `max_bytes`.

    The body is read here first (Content-Length checked up front, chunked bodies counted as they
    arrive), then handed to the app in one piece; later `receive` calls (disconnect detection)
    pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, size: int) -> None:
        """Read (and drop) the rest of an oversized body, up to a bound, so that the client is
        reading when the 413 comes rather than meeting a reset connection mid-upload."""
        more = True
        while more and size < 4 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        err = APIError(
            413,
            f"request body larger than {self.max_bytes} bytes",
            code="request_too_large",
        )
        log.info("%s %s 413 request_too_large", scope.get("method"), scope.get("path"))
        body = json.dumps(err.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
