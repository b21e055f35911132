"""Over one keep-alive connection to a real uvicorn server: a 500 answers without closing the connection, and
the next request on it succeeds."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.engine import Engine
from tests.server_helpers import make_app, tiny_engine, uvicorn_serving

BOOM = "boom"  # a text the failing engine below cannot encode, the way no real input should fail


def failing_on_boom(engine: Engine) -> Engine:
    """The engine, except that encoding a text that says BOOM raises an exception nothing handles."""
    encode = engine.encode

    def encode_or_fail(texts: Sequence[str], *args: Any) -> Any:
        if BOOM in texts:
            raise RuntimeError("an unexpected failure")
        return encode(texts, *args)

    engine.encode = encode_or_fail  # type: ignore[method-assign]
    return engine


class Connection:
    """One HTTP/1.1 keep-alive connection; it fails loudly instead of reconnecting."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        self.http.connect()
        self.socket = self.http.sock

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # json.dumps writes ASCII, so a lone surrogate travels as its \u escape: valid JSON, not valid text.
        payload = json.dumps(body).encode()
        self.http.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
        response = self.http.getresponse()
        answer = json.loads(response.read())
        assert response.getheader("connection") != "close", "the server asked to close the connection"
        assert self.http.sock is self.socket, "the client had to reconnect"
        return response.status, answer

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def single_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.helpers import write_vocab

    directory = tmp_path_factory.mktemp("keepalive-tokenizer")
    write_vocab(directory)
    with uvicorn_serving(make_app(failing_on_boom(tiny_engine(directory)))) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "failing", "good"),
    [
        ("/v1/classify", {"text": BOOM}, {"text": "good"}),
        ("/predict", {"inputs": BOOM}, {"inputs": "good"}),
        ("/", {"inputs": [[BOOM]]}, {"inputs": [["good"]]}),
        ("/invocations", {"inputs": BOOM}, {"inputs": "good"}),
    ],
)
def test_a_500_answers_json_and_keeps_the_connection(
    single_url: str, path: str, failing: dict[str, Any], good: dict[str, Any]
) -> None:
    connection = Connection(single_url)
    try:
        status, answer = connection.post(path, failing)
        assert status == 500 and answer == {
            "error": "internal error; the server logged the details",
            "error_type": "internal",
        }
        assert connection.post(path, good)[0] == 200
        # ... and the failure was counted like any other answer.
        connection.http.request("GET", "/metrics")
        page = connection.http.getresponse().read().decode()
        assert f'deebert_requests_total{{route="{path}",status="500"}}' in page
    finally:
        connection.close()
