"""Pure ASGI middleware: the body-size limit and request metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.error_handlers import error_response
from server.errors import DeeBertError, ErrorType
from server.state import ServerState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# POSTs to these paths run the model: they count in deebert_inflight_requests (what the autoscaler reads).
INFERENCE_PATHS = frozenset({"/v1/classify", "/predict", "/", "/invocations"})


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
        status = 500
        metrics = self.state.metrics
        inference = scope["method"] == "POST" and scope.get("path", "") in INFERENCE_PATHS
        if inference and metrics is not None:
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
                receive = _replay(body, receive)
            await self.app(scope, receive, send_recording)
        finally:
            if metrics is not None:
                if inference:
                    metrics.record_inflight(-1)
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                metrics.record_request(label, status, time.perf_counter() - started)

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


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
