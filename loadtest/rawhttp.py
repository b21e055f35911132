"""A minimal HTTP/1.1 client on asyncio streams, for offering load the server is not the bottleneck of.

httpx costs a few hundred microseconds of CPU per request; on a 2-core machine that the server shares, an
open-loop generator built on it cannot offer 3× the server's capacity (it fell seconds behind its schedule
and dropped most arrivals). This client writes one pre-formatted request and reads one response per call
over keep-alive connections, at a small fraction of that cost. It speaks exactly what the load generator
needs of HTTP/1.1: POST with a JSON body, Content-Length or chunked responses, and `Connection: close`.
Errors are raised as httpx's exception classes, so the generator counts them the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx


class RawResponse:
    """The parts of an httpx.Response the load generator reads."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = httpx.Headers(headers)
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# A pooled connection idle longer than this is closed instead of reused: servers close idle keep-alive
# connections (uvicorn after 5 s), and a request written into one the server is closing is lost.
MAX_IDLE_S = 2.0


class RawClient:
    """`await client.post(path, json=..., headers=...)` over a pool of keep-alive connections."""

    def __init__(self, base_url: str, timeout: float, max_connections: int, headers: dict[str, str] | None = None):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the raw client speaks plain http to a host, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self.max_connections = max_connections
        self._fixed_headers = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in (headers or {}).items()
        )
        self._idle: list[tuple[_Connection, float]] = []  # (connection, when it went idle)
        self._open = 0
        self._slots = asyncio.Semaphore(max_connections)

    async def post(self, path: str, json: Any, headers: dict[str, str] | None = None) -> RawResponse:
        body = _dumps(json)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = f"POST {path} HTTP/1.1\r\n{self._fixed_headers}{extra}Content-Length: {len(body)}\r\n\r\n"
        async with self._slots:
            connection = await self._connection()
            try:
                response, keep = await asyncio.wait_for(self._exchange(connection, head.encode() + body), self.timeout)
            except TimeoutError:
                self._close(connection)
                raise httpx.ReadTimeout(f"no response within {self.timeout} s") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
                self._close(connection)
                raise httpx.ReadError(f"{type(err).__name__}: {err}") from None
            if keep:
                self._idle.append((connection, time.monotonic()))
            else:
                self._close(connection)
            return response

    async def _connection(self) -> _Connection:
        while self._idle:
            connection, since = self._idle.pop()
            if time.monotonic() - since < MAX_IDLE_S and not connection[0].at_eof():
                return connection
            self._close(connection)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        except (OSError, TimeoutError) as err:
            raise httpx.ConnectError(f"{type(err).__name__}: {err}") from None
        self._open += 1
        return reader, writer

    @staticmethod
    async def _exchange(connection: _Connection, request: bytes) -> tuple[RawResponse, bool]:
        reader, writer = connection
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            content = b"".join(chunks)
        else:
            content = await reader.readexactly(int(headers.get("content-length", "0")))
        keep = headers.get("connection", "").lower() != "close"
        return RawResponse(status, headers, content), keep

    def _close(self, connection: _Connection) -> None:
        self._open -= 1
        connection[1].close()

    async def aclose(self) -> None:
        while self._idle:
            self._close(self._idle.pop()[0])


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
