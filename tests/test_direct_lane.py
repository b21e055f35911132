"""The direct lane (`server.routes.direct`): which requests it answers itself, which it hands to FastAPI unchanged,
and that its answers are the route's answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.engine import Engine
from server.middleware import ASGIApp, Receive, Scope, Send, replay
from server.routes.direct import DirectLane
from server.schemas import ClassifyRequest, PredictRequest
from tests.helpers import assert_same_answer
from tests.server_helpers import make_app, serving, tiny_engine

pytestmark = pytest.mark.anyio
TIMING_HEADERS = {
    "x-tokenization-time",
    "x-queue-time",
    "x-compute-time",
    "x-total-time",
    "x-inference-time",
    "content-length",
}


@pytest.fixture
def engine(tokenizer_dir: Path) -> Engine:
    return tiny_engine(tokenizer_dir)


def the_lane(app: FastAPI) -> DirectLane:
    """The app's DirectLane, found in its middleware stack (Starlette builds it at the first request)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    layer: Any = app.middleware_stack
    while layer is not None and not isinstance(layer, DirectLane):
        layer = getattr(layer, "app", None)
    assert isinstance(layer, DirectLane), "the app has no direct lane"
    return layer


class PassedOn:
    """Wraps what the lane hands requests on to (FastAPI's router), counting them and the bodies it reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await self.app(scope, replay(message, receive), send)


@contextmanager
def watching(app: FastAPI) -> Iterator[PassedOn]:
    lane = the_lane(app)
    passed_on = PassedOn(lane.app)
    lane.app = passed_on
    try:
        yield passed_on
    finally:
        lane.app = passed_on.app


async def test_well_formed_inference_requests_are_answered_by_the_lane(engine: Engine) -> None:
    app = make_app(engine)
    async with serving(app) as client:
        with watching(app) as passed_on:
            classify = await client.post("/v1/classify", json={"texts": ["good", "bad"]})
            charset = await client.post(
                "/v1/classify",
                content=b'{"text": "good"}',
                headers={"Content-Type": "application/json; charset=utf-8", "X-Exit-Threshold": "0"},
            )
            predicted = [await client.post(path, json={"inputs": "good"}) for path in ("/predict", "/", "/invocations")]
            assert passed_on.bodies == [], "FastAPI's routes saw none of them"
            model = await client.get("/v1/model")
            assert len(passed_on.bodies) == 1, "other routes go on to FastAPI"
        with watching(app) as passed_on:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, root_path="/api"), base_url="http://deebert.test"
            ) as prefixed:
                behind_root_path = await prefixed.post("/api/v1/classify", json={"text": "good"})
            assert len(passed_on.bodies) == 1, "behind a root path Starlette routes it"
        metrics = (await client.get("/metrics")).text
    assert classify.status_code == 200 and [r["label_id"] in (0, 1) for r in classify.json()["results"]] == [True] * 2
    assert charset.status_code == 200 and charset.json()["threshold"] == 0.0, "the header's threshold is read"
    assert charset.json()["results"][0]["exit_layer"] == engine.num_layers
    assert all(r.status_code == 200 and isinstance(r.json(), list) for r in predicted)
    assert model.status_code == 200
    assert behind_root_path.status_code == 200, behind_root_path.text
    # Counted under their routes, as FastAPI's routes are.
    assert 'deebert_requests_total{route="/v1/classify",status="200"} 3.0' in metrics
    assert 'deebert_requests_total{route="/predict",status="200"} 1.0' in metrics
    assert 'deebert_requests_total{route="/",status="200"} 1.0' in metrics


BAD_REQUESTS: list[tuple[dict[str, Any], int, str]] = [
    ({"content": b'{"texts": ["good"'}, 400, "malformed_json"),
    ({"content": b'{"text": "a", "text": "b"}'}, 400, "duplicate_key"),
    ({"content": b'\xff\xfe{"text": "a"}'}, 400, "malformed_json"),
    ({"content": b'{"text": "good"}', "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b'{"text": "good"}', "headers": {"Content-Type": ""}}, 415, "unsupported_media_type"),
    ({"content": b""}, 422, "empty_input"),
    ({"json": {"texts": [1, 2]}}, 422, "validation"),
    ({"json": ["good"]}, 422, "validation"),
    ({"json": {"text": "good", "surprise": True}}, 422, "validation"),
]


@pytest.mark.parametrize(("request_options", "status", "error_type"), BAD_REQUESTS, ids=repr)
async def test_a_request_the_lane_cannot_take_goes_to_fastapi_whole(
    engine: Engine, request_options: dict[str, Any], status: int, error_type: str
) -> None:
    app = make_app(engine)
    options = {"headers": {"Content-Type": "application/json"}, **request_options}
    if "json" in options:
        options["headers"] = {}
    async with serving(app) as client:
        with watching(app) as passed_on:
            answer = await client.post("/v1/classify", **options)
            valid = await client.post("/v1/classify", json={"text": "good"})
    sent = httpx.Request("POST", "http://x", **{k: v for k, v in options.items() if k != "headers"}).read()
    assert answer.status_code == status and answer.json()["error_type"] == error_type, answer.text
    assert passed_on.bodies == [sent], "FastAPI got the request, with its whole body"
    assert valid.status_code == 200, "the next request is served"


async def test_errors_after_validation_are_the_lanes_in_the_one_error_shape(engine: Engine) -> None:
    app = make_app(engine, api_key="s3cret", max_texts_per_request=2)
    async with serving(app) as client:
        with watching(app) as passed_on:
            no_key = await client.post("/v1/classify", json={"text": "good"})
            key = {"Authorization": "Bearer s3cret"}
            unknown = await client.post("/v1/classify", json={"text": "good"}, headers={**key, "X-Exit-Threshold": "?"})
            too_many = await client.post("/v1/classify", json={"texts": ["a", "b", "c"]}, headers=key)
            empty = await client.post("/v1/classify", json={"texts": []}, headers=key)
            negative = await client.post("/v1/classify", json={"text": "good", "threshold": -1}, headers=key)
            pair = await client.post("/predict", json={"inputs": ["good", "bad"]}, headers=key)
            fine = await client.post("/v1/classify", json={"text": "good"}, headers=key)
            assert passed_on.bodies == []
            # A body FastAPI cannot parse says so before the key is asked for, as FastAPI's route does.
            malformed = await client.post("/v1/classify", content=b"{", headers={"Content-Type": "application/json"})
    assert no_key.status_code == 401 and no_key.json()["error_type"] == "unauthorized"
    assert no_key.headers["WWW-Authenticate"] == "Bearer"
    assert unknown.status_code == 422 and unknown.json()["error_type"] == "unknown_preset"
    assert too_many.status_code == 413 and too_many.json()["error_type"] == "too_many_texts"
    assert empty.status_code == 422 and empty.json()["error_type"] == "empty_input"
    assert negative.status_code == 422 and negative.json()["error_type"] == "invalid_threshold"
    assert pair.status_code == 422 and "pair" in pair.json()["error"], "TEI reads two strings as a pair"
    assert fine.status_code == 200
    assert malformed.status_code == 400 and malformed.json()["error_type"] == "malformed_json"


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/classify", {"texts": ["the movie was good", "bad"], "return_probabilities": True}, {}),
        ("/v1/classify", {"text": "good"}, {"X-Exit-Threshold": "fast"}),
        ("/predict", {"inputs": [["good"], ["bad"]], "raw_scores": True}, {}),
        ("/", {"inputs": "good", "truncate": True, "truncation_direction": "left"}, {"X-Exit-Threshold": "0"}),
    ],
    ids=repr,
)
async def test_the_lanes_answer_is_the_routes_answer(
    engine: Engine, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    app = make_app(engine)
    async with serving(app) as client:
        direct = await client.post(path, json=body, headers=headers)
        lane = the_lane(app)
        routes, lane._routes = lane._routes, {}  # every request goes on to FastAPI's route
        try:
            with watching(app) as passed_on:
                routed = await client.post(path, json=body, headers=headers)
            assert len(passed_on.bodies) == 1
        finally:
            lane._routes = routes
    assert direct.status_code == routed.status_code == 200
    assert_same_answer(direct.json(), routed.json())
    assert set(direct.headers) == set(routed.headers)
    for name in set(direct.headers) - TIMING_HEADERS:
        assert direct.headers[name] == routed.headers[name], name


def every_input(dependant: Any) -> set[tuple[str, str]]:
    """What a FastAPI route reads from a request, its dependencies' reads included: (kind, name) pairs."""
    found = {("query", p.alias) for p in dependant.query_params}
    found |= {("header", p.alias.lower()) for p in dependant.header_params}
    found |= {("cookie", p.alias) for p in dependant.cookie_params}
    found |= {("path", p.alias) for p in dependant.path_params}
    found |= {("body", p.alias) for p in dependant.body_params}
    found |= {("dependency", d.call.__name__) for d in dependant.dependencies if d.call is not None}
    for sub in dependant.dependencies:
        found |= every_input(sub)
    return found


def test_the_lane_reads_everything_the_routes_read(engine: Engine) -> None:
    """The lane answers for FastAPI's inference routes, so it must read all that they read: a parameter or a
    dependency added to a route must be added to the lane too (server/routes/direct.py), or this fails."""
    handled = {
        ("header", "x-exit-threshold"),
        ("header", "authorization"),
        ("body", "body"),
        ("dependency", "require_api_key"),
        ("dependency", "server_state"),
    }
    app = make_app(engine)
    routes = the_lane(app).routes({"app": app})
    assert sorted(routes) == ["/", "/invocations", "/predict", "/v1/classify"]
    for path, lane in routes.items():
        assert every_input(lane.route.dependant) == handled, path
        assert lane.request_model is (ClassifyRequest if path == "/v1/classify" else PredictRequest), path
