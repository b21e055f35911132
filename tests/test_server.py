"""The HTTP API in-process (httpx ASGITransport + the real lifespan) on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine import Engine
from tests.server_helpers import make_app, serving, tiny_engine, uvicorn_serving

pytestmark = pytest.mark.anyio
HUGE = "1000"


@pytest.fixture
def engine(tokenizer_dir: Path) -> Engine:
    return tiny_engine(tokenizer_dir)


async def test_header_threshold_zero_runs_full_depth_and_huge_exits_at_layer_one(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        full = await client.post(
            "/v1/classify", json={"texts": ["the movie was good", "bad"]}, headers={"X-Exit-Threshold": "0"}
        )
        early = await client.post(
            "/v1/classify", json={"texts": ["the movie was good", "bad"]}, headers={"X-Exit-Threshold": HUGE}
        )
    assert full.status_code == 200 and early.status_code == 200
    assert [r["exit_layer"] for r in full.json()["results"]] == [4, 4]
    assert full.headers["X-Exit-Layer"] == "4" and full.headers["X-Layers-Executed"] == "8"
    assert [r["exit_layer"] for r in early.json()["results"]] == [1, 1]
    assert early.headers["X-Exit-Layer"] == "1" and early.headers["X-Layers-Executed"] == "2"
    assert full.json()["threshold"] == 0.0 and early.json()["threshold"] == 1000.0
    for name in ("X-Tokenization-Time", "X-Queue-Time", "X-Compute-Time", "X-Total-Time"):
        assert float(full.headers[name]) >= 0
    parts = sum(float(full.headers[name]) for name in ("X-Tokenization-Time", "X-Queue-Time", "X-Compute-Time"))
    assert float(full.headers["X-Total-Time"]) >= parts, "the total holds tokenizing, queueing and the model"


async def test_preset_names_default_and_body_over_header(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        preset = await client.post("/v1/classify", json={"text": "good"}, headers={"X-Exit-Threshold": "fast"})
        default = await client.post("/v1/classify", json={"text": "good"})
        body_wins = await client.post(
            "/v1/classify", json={"text": "good", "threshold": 0}, headers={"X-Exit-Threshold": HUGE}
        )
        body_preset = await client.post("/v1/classify", json={"text": "good", "threshold": "lossless"})
    assert preset.json()["threshold"] == 0.5
    assert default.json()["threshold"] == 0.2, "the checkpoint's balanced preset is the default"
    assert body_wins.json()["threshold"] == 0.0 and body_wins.json()["results"][0]["exit_layer"] == 4
    assert body_preset.json()["threshold"] == 0.05


async def test_results_match_the_model_and_keep_input_order(engine: Engine) -> None:
    texts = ["the movie was good", "awful and boring", "i love this cat", "the plot was dull but the cast was great"]
    async with serving(make_app(engine)) as client:
        response = await client.post(
            "/v1/classify", json={"texts": texts, "return_probabilities": True, "threshold": 0.3}
        )
    results = response.json()["results"]
    encoded = engine.tokenize(texts, None, truncate=True)
    outcomes: dict[int, Any] = {}
    engine.run_batch(encoded, [0.3] * len(texts), lambda row, outcome: outcomes.__setitem__(row, outcome))
    for row, result in enumerate(results):
        assert result["exit_layer"] == outcomes[row].exit_layer
        assert result["label"] == engine.labels[outcomes[row].label_id]
        assert result["probabilities"]["positive"] == pytest.approx(outcomes[row].probabilities[1], abs=1e-6)
        assert result["score"] == pytest.approx(max(outcomes[row].probabilities), abs=1e-6)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


async def test_concurrent_requests_with_different_thresholds_share_a_batch_and_answer_as_alone(engine: Engine) -> None:
    texts = ["the movie was good", "awful and boring", "i love this cat", "dull", "a man said the dog sat", "great fun"]
    thresholds = ["0", HUGE, "0.0001", "balanced", "fast", "0.3"]
    app = make_app(engine, max_wait_ms=10_000.0, max_batch_size=len(texts))  # starts when all are queued
    async with serving(app) as client:
        together = await asyncio.gather(
            *(
                client.post("/v1/classify", json={"text": t}, headers={"X-Exit-Threshold": h})
                for t, h in zip(texts, thresholds, strict=True)
            )
        )
        batches = app.state.deebert.metrics.batch_size.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        total = next(s.value for s in batches if s.name.endswith("_sum"))
        assert (count, total) == (1, len(texts)), "all six requests should have run as one batch"
    async with serving(make_app(engine, max_wait_ms=0.0)) as client:  # alone: no 10 s wait for company
        alone = [
            await client.post("/v1/classify", json={"text": t}, headers={"X-Exit-Threshold": h})
            for t, h in zip(texts, thresholds, strict=True)
        ]
    assert len({r.json()["results"][0]["exit_layer"] for r in together}) > 1
    for shared, single in zip(together, alone, strict=True):
        a, b = shared.json()["results"][0], single.json()["results"][0]
        assert (a["exit_layer"], a["label"]) == (b["exit_layer"], b["label"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


async def test_an_exiting_row_is_answered_before_its_batch_finishes(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    gate = threading.Event()
    reached_layer_2 = threading.Event()

    def hold_layer_2(_module: Any, _args: Any) -> None:
        reached_layer_2.set()
        assert gate.wait(10), "layer 2 was never released"

    engine.model.layers[1].register_forward_pre_hook(hold_layer_2)
    app = make_app(engine, max_wait_ms=10_000.0, max_batch_size=2)  # starts when both are queued
    async with serving(app) as client:
        early = asyncio.create_task(
            client.post("/v1/classify", json={"text": "good"}, headers={"X-Exit-Threshold": HUGE})
        )
        late = asyncio.create_task(client.post("/v1/classify", json={"text": "bad"}, headers={"X-Exit-Threshold": "0"}))
        done, _ = await asyncio.wait({early, late}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        # The early row has its answer while the late one has not: it cannot pass layer 2 until the gate opens.
        assert early in done and late not in done
        # ... and the batch it came in is still running: its other row is held inside layer 2.
        assert await asyncio.to_thread(reached_layer_2.wait, 10)
        assert not late.done()
        assert early.result().json()["results"][0]["exit_layer"] == 1
        gate.set()
        assert (await late).json()["results"][0]["exit_layer"] == 4


async def test_a_full_queue_answers_429_with_retry_after(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    gate = threading.Event()
    engine.model.layers[0].register_forward_pre_hook(lambda _m, _a: gate.wait(10) and None)
    app = make_app(engine, max_batch_size=1, max_queue_size=2)
    async with serving(app) as client:
        first = asyncio.create_task(client.post("/v1/classify", json={"text": "good"}))
        while app.state.deebert.batcher._running_rows == 0:
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(client.post("/v1/classify", json={"texts": ["a", "b"]}))
        while app.state.deebert.batcher.depth < 2:
            await asyncio.sleep(0.005)
        refused = await client.post("/v1/classify", json={"text": "one too many"})
        gate.set()
        accepted = [await first, await queued]
    assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert [r.status_code for r in accepted] == [200, 200]


JSON = {"content-type": "application/json"}
BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "malformed json",
        {"content": b'{"text": "x"', "headers": {"content-type": "application/json"}},
        400,
        "malformed_json",
    ),
    ("not json", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "empty_input"),
    ("no text", {"json": {}}, 422, "empty_input"),
    ("empty text", {"json": {"text": ""}}, 422, "empty_input"),
    ("blank text", {"json": {"text": "   "}}, 422, "empty_input"),
    ("empty list", {"json": {"texts": []}}, 422, "empty_input"),
    ("number as text", {"json": {"text": 5}}, 422, "validation"),
    ("list of numbers", {"json": {"texts": [1, 2]}}, 422, "validation"),
    ("text and texts", {"json": {"text": "a", "texts": ["b"]}}, 422, "validation"),
    ("unknown field", {"json": {"text": "a", "colour": "red"}}, 422, "validation"),
    ("pair on single model", {"json": {"text": "a", "text_pair": "b"}}, 422, "validation"),
    ("truncate not bool", {"json": {"text": "a", "truncate": "yes"}}, 422, "validation"),
    ("too many texts", {"json": {"texts": ["good"] * 9}}, 413, "too_many_texts"),
    ("too long, no truncate", {"json": {"text": "good " * 60, "truncate": False}}, 422, "input_too_long"),
    ("negative body threshold", {"json": {"text": "a", "threshold": -0.1}}, 422, "invalid_threshold"),
    (
        "nan body threshold",
        {"content": b'{"text": "a", "threshold": NaN}', "headers": {"content-type": "application/json"}},
        422,
        "invalid_threshold",
    ),
    (
        "infinite body threshold",
        {"content": b'{"text": "a", "threshold": Infinity}', "headers": {"content-type": "application/json"}},
        422,
        "invalid_threshold",
    ),
    ("bool body threshold", {"json": {"text": "a", "threshold": True}}, 422, "invalid_threshold"),
    ("unknown body preset", {"json": {"text": "a", "threshold": "turbo"}}, 422, "unknown_preset"),
    ("negative header", {"json": {"text": "a"}, "headers": {"X-Exit-Threshold": "-1"}}, 422, "invalid_threshold"),
    ("nan header", {"json": {"text": "a"}, "headers": {"X-Exit-Threshold": "nan"}}, 422, "invalid_threshold"),
    ("inf header", {"json": {"text": "a"}, "headers": {"X-Exit-Threshold": "inf"}}, 422, "invalid_threshold"),
    ("unknown header preset", {"json": {"text": "a"}, "headers": {"X-Exit-Threshold": "warp"}}, 422, "unknown_preset"),
    ("invalid utf-8", {"content": b'{"text": "\xff\xfe"}', "headers": JSON}, 400, "malformed_json"),
    (
        "deeply nested json",
        {"content": b'{"text": ' + b"[" * 1500 + b"]" * 1500 + b"}", "headers": JSON},
        400,
        "malformed_json",
    ),
    ("array body", {"json": ["good"]}, 422, "validation"),
    ("null text", {"json": {"text": None}}, 422, "empty_input"),
    ("null inside texts", {"json": {"texts": ["good", None]}}, 422, "validation"),
    ("10k texts", {"json": {"texts": ["good"] * 10_000}}, 413, "too_many_texts"),
    (
        "xml content type",
        {"content": b"<text>good</text>", "headers": {"content-type": "application/xml"}},
        415,
        "unsupported_media_type",
    ),
    ("list threshold", {"json": {"text": "a", "threshold": [1]}}, 422, "invalid_threshold"),
    ("1e400 threshold", {"content": b'{"text": "a", "threshold": 1e400}', "headers": JSON}, 422, "invalid_threshold"),
    ("non-ascii header", {"json": {"text": "a"}, "headers": {"X-Exit-Threshold": b"\xc3\xa9"}}, 422, "unknown_preset"),
    (
        "body too large",
        {"content": b'{"text": "' + b"a" * 300_000 + b'"}', "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
    ("duplicate key", {"content": b'{"text": "good", "text": "bad"}', "headers": JSON}, 400, "duplicate_key"),
    (
        "duplicate threshold key",
        {"content": b'{"text": "a", "threshold": 0, "threshold": "fast"}', "headers": JSON},
        400,
        "duplicate_key",
    ),
    (
        "duplicate key nested",
        {"content": b'{"texts": ["a"], "extra": [{"k": 1, "k": 2}]}', "headers": JSON},
        400,
        "duplicate_key",
    ),
    (
        "duplicate key, escaped spelling",
        {"content": b'{"text": "a", "t\\u0065xt": "b"}', "headers": JSON},
        400,
        "duplicate_key",
    ),
    # Valid JSON, not valid text: a \u escape that decodes to half of a UTF-16 surrogate pair.
    ("lone surrogate", {"content": b'{"text": "\\ud800"}', "headers": JSON}, 422, "invalid_text"),
    (
        "lone low surrogate in texts",
        {"content": b'{"texts": ["good", "a\\udfffb"]}', "headers": JSON},
        422,
        "invalid_text",
    ),
    ("surrogate as utf-8 bytes", {"content": b'{"text": "\xed\xa0\x80"}', "headers": JSON}, 422, "invalid_text"),
    ("lone surrogate in a key", {"content": b'{"text": "a", "\\ud800": 1}', "headers": JSON}, 422, "validation"),
    (
        "lone surrogate as threshold",
        {"content": b'{"text": "a", "threshold": "\\udbff"}', "headers": JSON},
        422,
        "unknown_preset",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_input_gets_a_clear_4xx(engine: Engine, case: tuple[str, dict[str, Any], int, str]) -> None:
    _, request, status, error_type = case
    app = make_app(engine, max_texts_per_request=8, max_body_bytes=200_000)
    async with serving(app) as client:
        response = await client.post("/v1/classify", **request)
        after = await client.post("/v1/classify", json={"text": "still serving"})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text and "/work/" not in response.text
    assert after.status_code == 200


async def test_duplicate_keys_are_refused_by_name_on_both_routes(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        classify = await client.post(
            "/v1/classify", content=b'{"texts": ["a"], "truncate": true, "truncate": 0}', headers=JSON
        )
        predict = await client.post("/predict", content=b'{"inputs": "a", "inputs": "b"}', headers=JSON)
        same_key_in_sibling_objects = await client.post(
            "/v1/classify", content=b'{"text": "a", "extra": [{"k": 1}, {"k": 2}]}', headers=JSON
        )
    assert classify.status_code == 400 and classify.json()["error_type"] == "duplicate_key"
    assert "'truncate'" in classify.json()["error"]
    assert predict.status_code == 400 and "'inputs'" in predict.json()["error"]
    # Keys repeat across objects all the time; only a repeat within one object is ambiguous.
    assert same_key_in_sibling_objects.json()["error_type"] == "validation", same_key_in_sibling_objects.text


async def test_input_too_long_names_its_token_count(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        response = await client.post("/v1/classify", json={"text": "good " * 60, "truncate": False})
        truncated = await client.post("/v1/classify", json={"text": "good " * 60})
    assert "62 tokens" in response.json()["error"] and "48" in response.json()["error"]
    assert truncated.status_code == 200


async def test_metrics_after_a_known_set_of_requests(engine: Engine) -> None:
    app = make_app(engine)
    async with serving(app) as client:
        await client.post("/v1/classify", json={"texts": ["good", "bad", "fun"]}, headers={"X-Exit-Threshold": "0"})
        await client.post("/v1/classify", json={"texts": ["dull", "great"]}, headers={"X-Exit-Threshold": HUGE})
        await client.post("/v1/classify", json={"text": ""})
        # A text's metrics are recorded right after its answer is handed over (on the loop's next turn; over a
        # network, before any next request is read).
        await asyncio.sleep(0)
        page = (await client.get("/metrics")).text
    values = _parse_metrics(page)
    n = 4
    assert values["deebert_samples_total"] == 5
    assert values["deebert_layers_executed_total"] == 3 * n + 2 * 1
    assert values["deebert_layers_possible_total"] == 5 * n
    assert values["deebert_expected_saving_ratio"] == pytest.approx(1 - (3 * n + 2) / (5 * n))
    assert values['deebert_exit_layer_bucket{le="1.0"}'] == 2
    assert values['deebert_exit_layer_bucket{le="3.0"}'] == 2
    assert values['deebert_exit_layer_bucket{le="4.0"}'] == 5
    assert values['deebert_requests_total{route="/v1/classify",status="200"}'] == 2
    assert values['deebert_requests_total{route="/v1/classify",status="422"}'] == 1
    assert values["deebert_queue_depth"] == 0 and values["deebert_inflight_requests"] == 0
    assert values['deebert_request_threshold_bucket{le="0.0"}'] == 3
    assert 'deebert_model_info{labels="negative,positive",model="tiny-bert",num_layers="4"} 1.0' in page
    for name in (
        "deebert_request_duration_seconds",
        "deebert_queue_duration_seconds",
        "deebert_inference_duration_seconds",
        "deebert_batch_size",
        "deebert_exit_entropy",
    ):
        assert f"{name}_count" in page


def _parse_metrics(page: str) -> dict[str, float]:
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_readiness_is_503_until_warm_up_ends_and_during_drain(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    warmed = threading.Event()
    real_warmup = engine.warmup

    def slow_warmup(batches: bool = True) -> None:
        assert warmed.wait(10)
        real_warmup(batches)

    engine.warmup = slow_warmup  # type: ignore[method-assign]
    app = make_app(engine, warmup=True)
    async with serving(app, wait_ready=False) as client:
        before = await client.get("/health/ready")
        refused = await client.post("/v1/classify", json={"text": "good"})
        live = await client.get("/health/live")
        warmed.set()
        await app.state.deebert.preparing
        after = await client.get("/health/ready")
        app.state.deebert.draining = True  # what SIGTERM does first
        draining = await client.get("/health/ready")
        app.state.deebert.draining = False
    assert before.status_code == 503 and before.json()["error_type"] == "not_ready"
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert live.status_code == 200
    assert after.status_code == 200 and after.json() == {"status": "ready"}
    assert draining.status_code == 503 and draining.json()["error_type"] == "shutting_down"


async def test_tei_predict_shape(tokenizer_dir: Path) -> None:
    single_model = tiny_engine(tokenizer_dir)
    async with serving(make_app(single_model)) as client:
        one = await client.post("/predict", json={"inputs": "the movie was good"})
        many = await client.post(
            "/predict", json={"inputs": ["good", "bad", "fun"]}, headers={"X-Exit-Threshold": HUGE}
        )
        wrong = await client.post("/predict", json={"inputs": 3})
    assert one.status_code == 200 and isinstance(one.json(), list)
    assert {s["label"] for s in one.json()} == {"negative", "positive"}
    assert one.json()[0]["score"] >= one.json()[1]["score"]
    assert len(many.json()) == 3 and all(isinstance(entry, list) and len(entry) == 2 for entry in many.json())
    assert many.headers["X-Exit-Layer"] == "1"
    assert wrong.status_code == 422 and wrong.json()["error_type"] == "validation"
    pair_model = tiny_engine(tokenizer_dir, pair=True)
    async with serving(make_app(pair_model)) as client:
        pairs = await client.post("/predict", json={"inputs": [["a cat sat", "a cat"], ["a dog", "the mat"]]})
        one_pair = await client.post("/predict", json={"inputs": ["a cat sat", "a cat"]})
        classify = await client.post("/v1/classify", json={"text": "a cat sat", "text_pair": "a cat"})
        missing_pair = await client.post("/v1/classify", json={"text": "a cat sat"})
    assert len(pairs.json()) == 2 and isinstance(pairs.json()[0], list)
    assert isinstance(one_pair.json()[0], dict)
    assert one_pair.json()[0]["score"] == pytest.approx(pairs.json()[0][0]["score"], abs=1e-4)
    assert classify.status_code == 200
    assert missing_pair.status_code == 422 and "pairs" in missing_pair.json()["error"]


async def test_model_info_lists_presets_and_layers(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        info = (await client.get("/v1/model")).json()
    assert info["num_layers"] == 4 and info["labels"] == ["negative", "positive"]
    assert info["default_threshold"] == 0.2 and info["default_threshold_name"] == "balanced"
    assert [p["name"] for p in info["presets"]] == ["lossless", "balanced", "fast"]
    assert info["max_length"] == 48


async def test_api_key_guards_inference_but_not_health(engine: Engine) -> None:
    async with serving(make_app(engine, api_key="s3cret")) as client:
        missing = await client.post("/v1/classify", json={"text": "good"})
        wrong = await client.post("/v1/classify", json={"text": "good"}, headers={"Authorization": "Bearer nope"})
        right = await client.post("/v1/classify", json={"text": "good"}, headers={"Authorization": "Bearer s3cret"})
        health = await client.get("/health/ready")
        metrics = await client.get("/metrics")
    assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.status_code == 401 and right.status_code == 200
    assert health.status_code == 200 and metrics.status_code == 200, "health and metrics are exempt by default"


@pytest.mark.parametrize(
    ("scope", "guarded", "open_routes"),
    [
        ({"api_key_metrics": True}, ["/metrics"], ["/health/live", "/health/ready"]),
        ({"api_key_health": True}, ["/health/live", "/health/ready"], ["/metrics"]),
        ({"api_key_metrics": True, "api_key_health": True}, ["/metrics", "/health/live", "/health/ready"], []),
    ],
)
async def test_api_key_guards_metrics_and_health_when_configured(
    engine: Engine, scope: dict[str, bool], guarded: list[str], open_routes: list[str]
) -> None:
    async with serving(make_app(engine, api_key="s3cret", **scope)) as client:
        for path in guarded:
            missing = await client.get(path)
            wrong = await client.get(path, headers={"Authorization": "Bearer s3cre"})
            right = await client.get(path, headers={"Authorization": "Bearer s3cret"})
            assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized", path
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            assert wrong.status_code == 401 and right.status_code == 200, path
        for path in open_routes:
            assert (await client.get(path)).status_code == 200, path
        schema = (await client.get("/openapi.json")).json()
        inference = await client.post("/v1/classify", json={"text": "good"})
    for path in guarded:
        assert "401" in schema["paths"][path]["get"]["responses"], f"{path} documents its 401"
    assert inference.status_code == 401


def test_protecting_metrics_or_health_without_a_key_is_a_settings_error() -> None:
    from pydantic import ValidationError

    from server.settings import ServerSettings

    with pytest.raises(ValidationError, match="DEEBERT_API_KEY"):
        ServerSettings(api_key_metrics=True)
    with pytest.raises(ValidationError, match="DEEBERT_API_KEY"):
        ServerSettings(api_key_health=True)
    assert ServerSettings(api_key="k", api_key_health=True).api_key_health


async def test_not_found_and_method_not_allowed_are_json(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        missing = await client.get("/v2/nothing")
        wrong_method = await client.get("/v1/classify")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error_type"] == "method_not_allowed"


async def test_openapi_documents_every_route_and_error(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in ("/v1/classify", "/predict", "/v1/model", "/health/live", "/health/ready", "/metrics"):
        assert path in paths
    classify = paths["/v1/classify"]["post"]
    assert {"400", "401", "413", "415", "422", "429", "503"} <= set(classify["responses"])
    assert any(p["name"] == "X-Exit-Threshold" for p in classify["parameters"])
    assert "ErrorResponse" in json.dumps(classify["responses"]["429"])


def test_threshold_resolution_rules(engine: Engine) -> None:
    assert engine.resolve_threshold("balanced").value == 0.2
    assert engine.resolve_threshold(" 0.25 ").value == 0.25
    assert engine.resolve_threshold(3).value == 3.0
    assert engine.resolve_threshold(None).preset == "balanced"
    assert math.isclose(engine.resolve_threshold("1e-3").value, 0.001)


async def test_a_vanished_client_does_not_disturb_its_batch_mates(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    gate = threading.Event()
    engine.model.layers[0].register_forward_pre_hook(lambda _m, _a: gate.wait(10) and None)
    app = make_app(engine, max_batch_size=1)
    async with serving(app) as client:
        holder = asyncio.create_task(client.post("/v1/classify", json={"text": "first"}))
        while app.state.deebert.batcher._running_rows == 0:
            await asyncio.sleep(0.005)
        vanishing = asyncio.create_task(client.post("/v1/classify", json={"text": "gone"}))
        staying = asyncio.create_task(client.post("/v1/classify", json={"text": "stay"}))
        while app.state.deebert.batcher.depth < 2:
            await asyncio.sleep(0.005)
        vanishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await vanishing
        await asyncio.sleep(0.05)
        assert app.state.deebert.batcher.depth == 1
        gate.set()
        results = [await holder, await staying]
        page = (await client.get("/metrics")).text
    assert [r.status_code for r in results] == [200, 200]
    values = _parse_metrics(page)
    assert values["deebert_samples_total"] == 2, "the vanished client's text never ran"
    assert values["deebert_queue_depth"] == 0 and values["deebert_inflight_requests"] == 0


@pytest.mark.parametrize("batches_on_loop", ["alone", "all", "none"])
async def test_warm_up_runs_where_batches_run_and_long_lived_objects_are_frozen(
    tokenizer_dir: Path, batches_on_loop: str
) -> None:
    import gc

    engine = tiny_engine(tokenizer_dir)
    threads: list[str] = []
    with_batches: list[bool] = []
    real_warmup = engine.warmup

    def recording_warmup(batches: bool = True) -> None:
        threads.append(threading.current_thread().name)
        with_batches.append(batches)
        real_warmup(batches)

    engine.warmup = recording_warmup  # type: ignore[method-assign]
    async with serving(make_app(engine, warmup=True, batches_on_loop=batches_on_loop)) as client:
        response = await client.post("/v1/classify", json={"text": "good"})
    # Batches run on the batch thread, and unless `none` on the event loop's too; warming any other thread would
    # leave the first requests cold (~200 ms).
    assert threads[0].startswith("deebert-batch")
    assert threads[1:] == ([] if batches_on_loop == "none" else [threading.current_thread().name])
    # The batch thread warms every path; the loop's only those it runs (lone texts with `alone`).
    assert with_batches == [True, *([batches_on_loop == "all"] if batches_on_loop != "none" else [])]
    # The model and everything loaded with it sit outside the garbage collector's generations, so no
    # request pays for a full collection over them.
    assert gc.get_freeze_count() > 0
    assert response.status_code == 200


async def test_long_texts_are_tokenized_off_the_loop_and_still_answered(engine: Engine) -> None:
    long_text = "the movie was good and the cast was great " * 600  # ~25k characters, over the inline limit
    async with serving(make_app(engine, max_body_bytes=1_048_576)) as client:
        truncated = await client.post("/v1/classify", json={"text": long_text})
        refused = await client.post("/v1/classify", json={"text": long_text, "truncate": False})
        small = await client.post("/v1/classify", json={"text": "good"})
    assert truncated.status_code == 200 and truncated.json()["results"][0]["exit_layer"] >= 1
    assert refused.status_code == 422 and refused.json()["error_type"] == "input_too_long"
    assert "5402 tokens" in refused.json()["error"]
    assert small.status_code == 200


@pytest.mark.parametrize("batches_on_loop", ["alone", "all", "none"])
async def test_which_batches_run_on_the_event_loop_and_a_wave_of_requests_makes_one_batch(
    tokenizer_dir: Path, batches_on_loop: str
) -> None:
    engine = tiny_engine(tokenizer_dir)
    seen: list[tuple[int, int, int]] = []  # (requests in flight, rows, thread) at each forward
    app = make_app(engine, batches_on_loop=batches_on_loop, max_wait_ms=0.0)
    engine.model.layers[0].register_forward_pre_hook(
        lambda _m, args: (
            seen.append((app.state.deebert.inference_in_flight, args[0].shape[0], threading.get_ident())) and None
        )
    )
    async with serving(app) as client:
        batcher = app.state.deebert.batcher
        batcher.alone_max_s = batcher.loop_max_s = 60.0  # a slow CI machine's batches still count as quick
        answers = [await client.post("/v1/classify", json={"text": text}) for text in ("good", "bad")]
        wave = [client.post("/v1/classify", json={"text": text}) for text in ("fine", "dull", "great")]
        pair = await client.post("/v1/classify", json={"texts": ["one", "two"]})  # times a batch of two
        answers += [pair, *await asyncio.gather(*wave)]
        assert [a.status_code for a in answers] == [200] * 6
        assert app.state.deebert.inference_in_flight == 0
    loop_thread = threading.get_ident()
    runs = [(rows, thread == loop_thread) for _, rows, thread in seen]
    # The first text times a batch of one on the batch thread, the pair a batch of two. Then, alone in the server,
    # the second text runs on the loop (`alone`, `all`). Of three requests sent together, `all` runs one batch on
    # the loop (it lets the requests in flight queue first); with `alone` they are not alone: the batch thread.
    if batches_on_loop == "all":
        assert runs == [(1, False), (1, True), (2, False), (3, True)]
    elif batches_on_loop == "alone":
        assert runs[:3] == [(1, False), (1, True), (2, False)] and not any(here for _, here in runs[3:])
    else:
        assert not any(here for _, here in runs) and sum(rows for rows, _ in runs) == 7
    assert [count for count, _, _ in seen[:3]] == [1, 1, 1]


@pytest.mark.parametrize("batches_on_loop", ["alone", "all", "none"])
async def test_the_model_endpoint_and_runtime_info_say_which_batches_run_on_the_loop(
    tokenizer_dir: Path, batches_on_loop: str
) -> None:
    app = make_app(tiny_engine(tokenizer_dir), batches_on_loop=batches_on_loop)
    async with serving(app) as client:
        info = (await client.get("/v1/model")).json()
        page = (await client.get("/metrics")).text
    assert info["batches_on_loop"] == batches_on_loop and f'batches_on_loop="{batches_on_loop}"' in page


def test_the_renamed_inline_alone_setting_still_works_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from server.settings import ServerSettings

    for old, read_as in (("false", "none"), ("true", "alone")):
        monkeypatch.setenv("DEEBERT_INLINE_ALONE", old)
        with caplog.at_level(logging.WARNING, logger="deebert.server"):
            assert ServerSettings().batches_on_loop == read_as
        assert "DEEBERT_BATCHES_ON_LOOP" in caplog.text
    monkeypatch.setenv("DEEBERT_BATCHES_ON_LOOP", "all")  # the new name wins
    assert ServerSettings().batches_on_loop == "all"
    monkeypatch.delenv("DEEBERT_BATCHES_ON_LOOP")
    monkeypatch.setenv("DEEBERT_INLINE_ALONE", "sometimes")
    with pytest.raises(ValueError, match="not a boolean"):
        ServerSettings()


@pytest.mark.parametrize(("rewarm", "batches_on_loop"), [(True, "alone"), (True, "none"), (False, "alone")])
async def test_the_tokenizer_is_rewarmed_once_the_server_falls_idle(
    tokenizer_dir: Path, rewarm: bool, batches_on_loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a request's answer (and no other request in flight), the engine tokenizes its short text once, on the
    event loop: a lone text run on the loop is re-warmed for as its request ends (before the client has the
    answer here, in-process), one run on the batch thread a turn after its batch. `DEEBERT_REWARM_WHEN_IDLE=false`
    turns it off. Single texts and pairs alike."""
    for pair in (False, True):
        engine = tiny_engine(tokenizer_dir, pair=pair)
        rewarms: list[str] = []
        rewarm_engine = engine.rewarm

        def counted(rewarm_engine: Any = rewarm_engine, rewarms: list[str] = rewarms) -> None:
            rewarm_engine()  # the real one: it must tokenize this model's kind of input
            rewarms.append(threading.current_thread().name)

        monkeypatch.setattr(engine, "rewarm", counted)
        body = {"text": "good", "text_pair": "fine"} if pair else {"text": "good"}
        app = make_app(engine, rewarm_when_idle=rewarm, batches_on_loop=batches_on_loop, warmup=True)
        async with serving(app) as client:
            rewarms.clear()  # (the warm-up's batches may end in one)
            for expected in (1, 2, 3):
                response = await client.post("/v1/classify", json=body)
                assert response.status_code == 200, response.text
                if not rewarm:
                    expected = 0
                elif batches_on_loop == "none" or expected == 1:  # (the first lone text runs on the thread)
                    for _ in range(100):
                        if len(rewarms) >= expected:
                            break
                        await asyncio.sleep(0.005)
                assert len(rewarms) == expected, (pair, batches_on_loop, rewarms)
            await asyncio.sleep(0.01)
            assert len(rewarms) == (3 if rewarm else 0), "once per request here: each is a busy spell of its own"
        assert set(rewarms) <= {threading.current_thread().name}, "on the event loop"


def test_under_uvicorn_each_lone_request_is_rewarmed_for_after_its_answer(tokenizer_dir: Path) -> None:
    """Under a real uvicorn server, which counts a request as in flight until its task's done-callback has run (what
    the batcher reads to run a lone text at once): each lone text, run inside its request's own turn, is re-warmed
    for once its request has ended, with no further request to trigger it."""
    engine = tiny_engine(tokenizer_dir)
    rewarms: list[float] = []
    rewarm_engine = engine.rewarm

    def counted() -> None:
        rewarm_engine()
        rewarms.append(time.monotonic())

    engine.rewarm = counted  # type: ignore[method-assign]
    ran_on: list[str] = []
    run_batch = engine.run_batch

    def recorded(*args: Any, **kwargs: Any) -> None:
        ran_on.append(threading.current_thread().name)
        run_batch(*args, **kwargs)

    engine.run_batch = recorded  # type: ignore[method-assign]
    app = make_app(engine, warmup=True)
    with uvicorn_serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for request in range(6):
            before = len(rewarms)
            assert client.post("/v1/classify", json={"text": "good"}).status_code == 200
            deadline = time.monotonic() + 5
            while len(rewarms) == before:
                assert time.monotonic() < deadline, f"no re-warm after request {request + 1}"
                time.sleep(0.002)
            assert not app.state.deebert.batcher.busy
    assert ran_on[-5:] == ["uvicorn"] * 5, "after the first, each lone text ran on the event loop's thread"


def test_the_rewarm_is_for_the_cpu_only(tokenizer_dir: Path) -> None:
    """On a GPU the model's call leaves the CPU's caches alone: no re-warm is wired there."""
    import torch

    from server.state import build_state
    from tests.server_helpers import settings

    engine = tiny_engine(tokenizer_dir)
    on_cpu = build_state(settings(), engine).batcher
    engine.device = torch.device("cuda")  # (only its type is read here; nothing runs)
    on_gpu = build_state(settings(), engine).batcher
    off = build_state(settings(rewarm_when_idle=False), tiny_engine(tokenizer_dir)).batcher
    assert on_cpu is not None and on_gpu is not None and off is not None
    assert on_cpu._on_quiet is not None and on_gpu._on_quiet is None and off._on_quiet is None
