"""The ASGI gate in front of the routes: request ids, bearer auth, the body cap, JSON access logs, metrics."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sdexport.serve.errors import error_body

access_log = logging.getLogger("sdexport.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = ("/v1/", "/metrics")
"""Path prefixes that need the bearer token when auth is on (health checks and docs stay open)."""
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/generate", "/healthz", "/readyz", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
JSON_ENDPOINTS = ("/v1/images/generations", "/v1/generate")
"""Routes whose body is always JSON: one sent as a form (``curl -d`` without a Content-Type) is read as JSON."""


def json_content_type(scope: Scope) -> None:
    """Read a JSON route's body as JSON when the client sent no Content-Type or curl's form default."""
    if scope.get("method") != "POST" or scope.get("path") not in JSON_ENDPOINTS:
        return
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    given = dict(scope.get("headers") or []).get(b"content-type", b"")
    if given.split(b";")[0].strip().lower() in (b"", b"application/x-www-form-urlencoded"):
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


def token_matches(header: bytes | None, key: str) -> bool:
    """Whether an Authorization header carries ``Bearer <key>`` (constant-time comparison)."""
    scheme, _, token = (header or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _reply(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Gate:
    """Wraps the app: every HTTP request gets an id (``X-Request-ID``), is authenticated, capped and logged."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 observe: Callable[[str, int, float], None] | None = None) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.observe = observe or (lambda endpoint, status, seconds: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        json_content_type(scope)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id, headers)
        finally:
            self._log(scope, request_id, status["code"], time.perf_counter() - t0)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED) and not token_matches(headers.get(b"authorization"),
                                                                             self.api_key):
            await _reply(send, 401, error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"),
                         [(b"www-authenticate", b"Bearer")])
            return
        body = await self._body(receive, headers)
        if body is None:
            await _reply(send, 413, error_body(413, f"the request body is over the server's limit of "
                                                    f"{self.max_body_bytes} bytes (--max-body-bytes)", "body"), [])
            return
        await self.app(scope, _replay(body, receive), send)

    async def _body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes | None:
        """The whole body, or None as soon as it is over the cap (announced or streamed)."""
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _log(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        self.observe(path if path in ENDPOINTS else "other", status, seconds)
        client = scope.get("client") or ("", 0)
        access_log.info(json.dumps({"request_id": request_id, "method": scope.get("method"), "path": path,
                                    "status": status, "seconds": round(seconds, 4), "client": client[0]}))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body over once, then passes the client's messages (disconnect) on."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
