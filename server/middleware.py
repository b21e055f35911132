"""Pure ASGI middleware: the body-size limit and request metrics, and the last-resort 500.

Order in `create_app` (outermost first): `UnexpectedErrorMiddleware` → `ServingMiddleware` → FastAPI's routing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.error_handlers import error_response
from server.errors import DeeBertError, ErrorType
from server.protocol import INFERENCE_PATHS
from server.state import ServerState

logger = logging.getLogger("deebert.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServingMiddleware:
    """Refuses bodies over the limit before parsing, and counts requests by route and status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what an exception escaping the app becomes (UnexpectedErrorMiddleware answers it)
        metrics = self.state.metrics
        inference = scope["method"] == "POST" and scope.get("path", "") in INFERENCE_PATHS
        if inference:
            self.state.inference_in_flight += 1
            if metrics is not None:
                metrics.record_inflight(+1)

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    limit = DeeBertError(
                        ErrorType.PAYLOAD_TOO_LARGE, f"request body exceeds {self.state.settings.max_body_bytes} bytes"
                    )
                    await error_response(limit)(scope, receive, send_recording)
                    return
                receive = replay({"type": "http.request", "body": body, "more_body": False}, receive)
            await self.app(scope, receive, send_recording)
        finally:
            if inference:
                self.state.inference_in_flight -= 1
            if metrics is not None:
                if inference:
                    metrics.record_inflight(-1)
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                metrics.record_request(label, status, time.perf_counter() - started)
            if inference and self.state.batcher is not None:
                # The answer is out: if the server is now idle, the work for a quiet moment (the tokenizer's
                # re-warm) runs here, before the client's next request can arrive.
                self.state.batcher.run_if_quiet(requests_of_caller=1)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.state.settings.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                with contextlib.suppress(ValueError):
                    if int(value) > limit:
                        return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def replay(message: Message, receive: Receive) -> Receive:
    """`receive` that hands back `message` (already read) first, then reads on: for an app after one that read
    the body (the body limit here, the direct lane before FastAPI)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return message
        return await receive()

    return replayed


class UnexpectedErrorMiddleware:
    """Answers an exception no handler took with a 500 `internal` error, and keeps the connection.

    Starlette's own last resort (ServerErrorMiddleware) sends its 500 and then re-raises, and uvicorn closes
    a connection whose application raised: the client's next request on that keep-alive connection (a
    pooled client's, a load balancer's) would fail although nothing was wrong with it. Here the exception
    ends with the response. Only when the response had already started is it re-raised: a half-sent
    response cannot be completed, so closing the connection is then the honest end.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_tracking(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if response_started:
                raise
            logger.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            internal = DeeBertError(ErrorType.INTERNAL, "internal error; the server logged the details")
            await error_response(internal)(scope, receive, send)
