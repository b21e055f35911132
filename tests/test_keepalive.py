"""Over one keep-alive connection to a real uvicorn server: text that is valid JSON but not valid Unicode is a
422 on every route, a 500 answers without closing the connection, and the next request on it succeeds."""

from __future__ import annotations

import http.client
import json
import socket
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine import Engine
from tests.server_helpers import EVERY_CATEGORY, make_app, tiny_engine, uvicorn_serving

BOOM = "boom"  # a text the failing engine below cannot encode, the way no real input should fail


def failing_on_boom(engine: Engine) -> Engine:
    """The engine, except that tokenizing a text that says BOOM raises an exception nothing handles."""
    tokenize = engine.tokenize

    def tokenize_or_fail(texts: Sequence[str], *args: Any) -> Any:
        if BOOM in texts:
            raise RuntimeError("an unexpected failure")
        return tokenize(texts, *args)

    engine.tokenize = tokenize_or_fail  # type: ignore[method-assign]
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


@pytest.fixture(scope="module")
def pair_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.helpers import write_vocab

    directory = tmp_path_factory.mktemp("keepalive-pair-tokenizer")
    write_vocab(directory)
    with uvicorn_serving(make_app(tiny_engine(directory, pair=True))) as url:
        yield url


LONE = "\ud800"
# (route, a body whose text holds a lone surrogate, the same body with valid text)
SINGLE_ROUTES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("/v1/classify", {"text": f"good {LONE}"}, {"text": "good"}),
    ("/v1/classify", {"texts": ["good", "\udfff"]}, {"texts": ["good", "bad"]}),
    ("/predict", {"inputs": f"x{LONE}y"}, {"inputs": "good"}),
    ("/predict", {"inputs": [["good"], [LONE]]}, {"inputs": [["good"], ["bad"]]}),
    ("/", {"inputs": LONE}, {"inputs": "good"}),
    ("/invocations", {"inputs": [[LONE]]}, {"inputs": [["good"]]}),
]
PAIR_ROUTES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("/v1/classify", {"text": "a cat", "text_pair": LONE}, {"text": "a cat", "text_pair": "a dog"}),
    (
        "/v1/classify",
        {"texts": ["a", "b"], "text_pairs": ["c", f"\udc00{LONE}"]},
        {"texts": ["a"], "text_pairs": ["c"]},
    ),
    ("/predict", {"inputs": ["a cat", LONE]}, {"inputs": ["a cat", "a dog"]}),
    ("/", {"inputs": [["a", "b"], [LONE, "c"]]}, {"inputs": [["a", "b"]]}),
]


@pytest.mark.parametrize(("path", "bad", "good"), SINGLE_ROUTES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_lone_surrogate_is_a_422_and_the_connection_serves_on(
    single_url: str, path: str, bad: dict[str, Any], good: dict[str, Any]
) -> None:
    _bad_then_good(single_url, path, bad, good)


@pytest.mark.parametrize(("path", "bad", "good"), PAIR_ROUTES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_lone_surrogate_in_a_pair_is_a_422_and_the_connection_serves_on(
    pair_url: str, path: str, bad: dict[str, Any], good: dict[str, Any]
) -> None:
    _bad_then_good(pair_url, path, bad, good)


def _bad_then_good(url: str, path: str, bad: dict[str, Any], good: dict[str, Any]) -> None:
    connection = Connection(url)
    try:
        status, answer = connection.post(path, bad)
        assert status == 422 and answer["error_type"] == "invalid_text", answer
        assert "lone surrogate" in answer["error"] and "\\ud" in answer["error"]
        status, _ = connection.post(path, good)
        assert status == 200
    finally:
        connection.close()


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


@pytest.fixture(scope="module")
def shared_connection(single_url: str) -> Iterator[Connection]:
    connection = Connection(single_url)
    yield connection
    connection.close()


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=EVERY_CATEGORY, max_size=12), route=st.sampled_from(["/v1/classify", "/predict"]))
def test_text_of_every_unicode_category_gets_an_answer_or_a_clear_422(
    shared_connection: Connection, text: str, route: str
) -> None:
    body = {"text": text} if route == "/v1/classify" else {"inputs": [[text], ["good"]]}
    status, answer = shared_connection.post(route, body)
    if any(unicodedata.category(c) == "Cs" for c in text):
        assert (status, answer["error_type"]) == (422, "invalid_text"), answer
    elif not text.strip():
        assert (status, answer["error_type"]) == (422, "empty_input"), answer
    else:
        assert status == 200, answer


def test_a_surrogate_written_in_utf8_bytes_is_a_422_too_and_the_connection_serves_on(single_url: str) -> None:
    parts = urlsplit(single_url)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=10) as raw:
        reader = raw.makefile("rb")
        # U+D800 encoded the way UTF-8 would encode it, were it a character: not valid UTF-8, but Python's JSON
        # decoder reads bytes with "surrogatepass", so the body parses to the same lone surrogate as "\ud800".
        first = _raw_post(raw, reader, b'{"text": "\xed\xa0\x80"}')
        invalid = _raw_post(raw, reader, b'{"text": "\xff\xfe"}')  # not UTF-8 at all
        second = _raw_post(raw, reader, b'{"text": "good"}')
    assert first[0] == 422 and json.loads(first[1])["error_type"] == "invalid_text"
    assert invalid[0] == 400 and json.loads(invalid[1])["error_type"] == "malformed_json"
    assert second[0] == 200


def _raw_post(raw: socket.socket, reader: Any, body: bytes) -> tuple[int, bytes]:
    """POST /v1/classify on an open socket; the status and body of the response."""
    head = f"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    raw.sendall(head.encode() + b"\r\n\r\n" + body)
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, reader.read(length)
