"""Under a real uvicorn server: a burst of requests after lone ones is batched, not run one by one.

A lone text runs at once on the event loop when no other request is in flight. uvicorn makes one task per request
as its head is read, and a task runs from the middleware to the batcher without yielding, so the middleware's
count alone saw every request of a burst as alone: each ran as a batch of one, and the server stayed so under
load (BENCHMARKS.md §23). The batcher also counts the requests uvicorn has accepted.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.engine import Engine
from tests.helpers import write_vocab
from tests.server_helpers import make_app, tiny_engine, uvicorn_serving

# A batch takes at least this long: long enough that the requests of a burst sent meanwhile arrive while one runs.
BATCH_S = 0.003
BURST = 16


def recording_sizes(engine: Engine, sizes: list[int]) -> Engine:
    """The engine, with each batch's size recorded and a batch taking at least BATCH_S."""
    run_batch = engine.run_batch

    def timed(items: list[Any], thresholds: list[float], on_exit: Callable[..., None]) -> None:
        sizes.append(len(items))
        time.sleep(BATCH_S)
        run_batch(items, thresholds, on_exit)

    engine.run_batch = timed  # type: ignore[method-assign]
    return engine


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    write_vocab(tmp_path)
    sizes: list[int] = []
    app = make_app(recording_sizes(tiny_engine(tmp_path), sizes))
    with uvicorn_serving(app) as url:
        # Lone texts run at once however long they take here: the test's threads share the GIL with the server's,
        # and a slow lone batch would otherwise send the next ones to the worker thread, by chance.
        app.state.deebert.batcher.alone_max_s = 60.0
        yield url, sizes


def _request(host: str, port: int, text: str) -> bytes:
    body = json.dumps({"text": text}).encode()
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_burst_after_lone_requests_is_batched(served: tuple[str, list[int]]) -> None:
    url, sizes = served
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    lone = http.client.HTTPConnection(host, port, timeout=30)
    for i in range(5):  # lone requests, one at a time: they run at once on the loop, as batches of one
        body = json.dumps({"text": f"good {i}"})
        lone.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
        response = lone.getresponse()
        assert response.status == 200, response.read()
        response.read()
    lone.close()
    assert sizes and set(sizes) == {1}
    sizes.clear()

    sockets = [socket.create_connection((host, port), timeout=30) for _ in range(BURST)]
    statuses: list[int] = []
    lock = threading.Lock()

    def read_answer(sock: socket.socket) -> None:
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        with lock:
            statuses.append(response.status)

    readers = [threading.Thread(target=read_answer, args=(sock,)) for sock in sockets]
    for reader in readers:
        reader.start()
    for i, sock in enumerate(sockets):  # the burst: every request sent before any answer is read
        sock.sendall(_request(host, port, f"a burst of texts, number {i}"))
    for reader in readers:
        reader.join(30)
    for sock in sockets:
        sock.close()

    assert statuses == [200] * BURST
    assert sum(sizes) == BURST
    assert max(sizes) > 1, f"every text of the burst ran alone: batches {sizes}"
