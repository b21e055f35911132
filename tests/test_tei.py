"""text-embeddings-inference's API: request and response shapes, headers, /info and health, and a real TEI
client library (huggingface_hub's InferenceClient and AsyncInferenceClient) against a real uvicorn server."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine import Engine
from server.routes.tei import Reply, predictions
from server.schemas import PredictRequest
from tests.helpers import assert_same_answer
from tests.server_helpers import make_app, serving, tiny_engine, uvicorn_serving, write_word_vocab

pytestmark = pytest.mark.anyio
HUGE = "1000"
TEI_HEADERS = (
    "x-compute-time",
    "x-compute-characters",
    "x-compute-tokens",
    "x-total-time",
    "x-tokenization-time",
    "x-queue-time",
    "x-inference-time",
)


@pytest.fixture
def engine(tokenizer_dir: Path) -> Engine:
    return tiny_engine(tokenizer_dir)


@pytest.fixture
def pair_engine(tokenizer_dir: Path) -> Engine:
    return tiny_engine(tokenizer_dir, pair=True)


# --- decode and encode, alone --------------------------------------------------------------------

SINGLE_MODEL_INPUTS: list[tuple[Any, list[str], bool]] = [
    ("a", ["a"], False),
    (["a"], ["a"], False),
    ([["a"]], ["a"], True),
    ([["a"], ["b"], ["c"]], ["a", "b", "c"], True),
    (["a", "b", "c"], ["a", "b", "c"], True),  # TEI refuses a flat list of three; we read it as a batch
]


@pytest.mark.parametrize(("inputs", "texts", "batched"), SINGLE_MODEL_INPUTS, ids=repr)
def test_inputs_on_a_single_text_model(inputs: Any, texts: list[str], batched: bool) -> None:
    assert PredictRequest(inputs=inputs).normalized(pair_model=False) == (texts, None, batched)


PAIR_MODEL_INPUTS: list[tuple[Any, list[str], list[str], bool]] = [
    (["a", "b"], ["a"], ["b"], False),  # one pair, as TEI reads it: not two texts
    ([["a", "b"]], ["a"], ["b"], True),
    ([["a", "b"], ["c", "d"]], ["a", "c"], ["b", "d"], True),
]


@pytest.mark.parametrize(("inputs", "texts", "pairs", "batched"), PAIR_MODEL_INPUTS, ids=repr)
def test_inputs_on_a_pair_model(inputs: Any, texts: list[str], pairs: list[str], batched: bool) -> None:
    assert PredictRequest(inputs=inputs).normalized(pair_model=True) == (texts, pairs, batched)


def test_predictions_are_sorted_by_score_and_cut_to_top_k() -> None:
    labels = ["a", "b", "c"]
    probabilities = [0.2, 0.5, 0.3]
    every = predictions(probabilities, labels, Reply(False, False, None))
    assert every == [{"score": 0.5, "label": "b"}, {"score": 0.3, "label": "c"}, {"score": 0.2, "label": "a"}]
    assert predictions(probabilities, labels, Reply(False, False, 2)) == every[:2]
    logs = predictions(probabilities, labels, Reply(False, True, None))
    assert [p["label"] for p in logs] == ["b", "c", "a"]
    assert [math.exp(p["score"]) for p in logs] == pytest.approx([0.5, 0.3, 0.2])
    # A probability that underflowed float32 has a finite log-probability (JSON has no -Infinity).
    assert predictions([1.0, 0.0], ["x", "y"], Reply(False, True, None))[1]["score"] == pytest.approx(-103.28, abs=0.01)


# --- the routes, in-process ----------------------------------------------------------------------


async def test_the_three_classify_routes_answer_alike_with_every_label_sorted(engine: Engine) -> None:
    texts = ["the movie was good", "awful and boring", "dull"]
    async with serving(make_app(engine)) as client:
        answers = [
            await client.post(path, json={"inputs": [[t] for t in texts]}, headers={"X-Exit-Threshold": "0"})
            for path in ("/predict", "/", "/invocations")
        ]
        ours = await client.post(
            "/v1/classify", json={"texts": texts, "return_probabilities": True}, headers={"X-Exit-Threshold": "0"}
        )
    assert [a.status_code for a in answers] == [200, 200, 200]
    batches = [a.json() for a in answers]
    assert batches[0] == batches[1] == batches[2]
    for scores, result in zip(batches[0], ours.json()["results"], strict=True):
        probabilities = result["probabilities"]
        assert [s["label"] for s in scores] == sorted(probabilities, key=lambda label: -probabilities[label])
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(probabilities)
        assert list(scores[0]) == ["score", "label"]


async def test_a_pair_sent_to_a_single_text_model_is_a_422_that_shows_the_batch_form(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        pair = await client.post("/predict", json={"inputs": ["great fun", "dull"]})
        batch_with_pair = await client.post("/predict", json={"inputs": [["great fun"], ["a", "b"]]})
        three = await client.post("/predict", json={"inputs": [["a", "b", "c"]]})
        empty = await client.post("/predict", json={"inputs": []})
        mixed = await client.post("/predict", json={"inputs": [["a"], "b"]})
    assert pair.status_code == 422 and pair.json()["error_type"] == "validation"
    assert "one sentence pair" in pair.json()["error"] and '[["first text"], ["second text"]]' in pair.json()["error"]
    assert batch_with_pair.status_code == 422 and "[text]" in batch_with_pair.json()["error"]
    assert three.status_code == 422 and "3 strings" in three.json()["error"]
    assert empty.status_code == 422 and empty.json()["error_type"] == "empty_input"
    assert mixed.status_code == 422 and mixed.json()["error_type"] == "validation"


async def test_a_pair_model_takes_pairs_and_refuses_single_texts(pair_engine: Engine) -> None:
    async with serving(make_app(pair_engine)) as client:
        one = await client.post("/predict", json={"inputs": ["a cat sat", "a cat"]})
        batch = await client.post("/", json={"inputs": [["a cat sat", "a cat"], ["a dog", "the mat"]]})
        single = await client.post("/predict", json={"inputs": "a cat sat"})
    assert one.status_code == 200 and isinstance(one.json()[0], dict)
    assert batch.status_code == 200 and len(batch.json()) == 2
    assert_same_answer(one.json(), batch.json()[0])  # alone vs inside a batch: other shapes, other last digits
    assert single.status_code == 422 and "[text, text_pair]" in single.json()["error"]


JSON = {"content-type": "application/json"}
BAD_TEI_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no inputs", {"json": {}}, 422, "validation"),
    ("number inputs", {"json": {"inputs": 3}}, 422, "validation"),
    ("null inside a batch", {"json": {"inputs": [["good"], [None]]}}, 422, "validation"),
    ("blank text", {"json": {"inputs": "  "}}, 422, "empty_input"),
    ("unknown field", {"json": {"inputs": "good", "normalize": True}}, 422, "validation"),
    ("truncate not bool", {"json": {"inputs": "good", "truncate": "yes"}}, 422, "validation"),
    ("raw_scores not bool", {"json": {"inputs": "good", "raw_scores": 1}}, 422, "validation"),
    ("too many inputs", {"json": {"inputs": [["good"]] * 9}}, 413, "too_many_texts"),
    ("lone surrogate", {"content": b'{"inputs": "\\ud800"}', "headers": JSON}, 422, "invalid_text"),
    (
        "lone surrogate in a batch",
        {"content": b'{"inputs": [["a"], ["\\udc00"]]}', "headers": JSON},
        422,
        "invalid_text",
    ),
    ("surrogate as utf-8 bytes", {"content": b'{"inputs": ["\xed\xb0\x80"]}', "headers": JSON}, 422, "invalid_text"),
    (
        "duplicate key",
        {"content": b'{"inputs": "a", "truncate": true, "truncate": false}', "headers": JSON},
        400,
        "duplicate_key",
    ),
    ("not json", {"content": b"good", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    (
        "unknown header preset",
        {"json": {"inputs": "good"}, "headers": {"X-Exit-Threshold": "warp"}},
        422,
        "unknown_preset",
    ),
]


@pytest.mark.parametrize("case", BAD_TEI_REQUESTS, ids=[c[0] for c in BAD_TEI_REQUESTS])
@pytest.mark.parametrize("path", ["/predict", "/", "/invocations"])
async def test_bad_tei_input_gets_a_clear_4xx(
    engine: Engine, path: str, case: tuple[str, dict[str, Any], int, str]
) -> None:
    _, request, status, error_type = case
    async with serving(make_app(engine, max_texts_per_request=8)) as client:
        response = await client.post(path, **request)
        after = await client.post(path, json={"inputs": "still serving"})
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and response.json()["error"]
    assert after.status_code == 200


async def test_raw_scores_top_k_and_function_to_apply(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        plain = (await client.post("/predict", json={"inputs": "the movie was good"})).json()
        raw = (await client.post("/predict", json={"inputs": "the movie was good", "raw_scores": True})).json()
        none = await client.post(
            "/predict", json={"inputs": "the movie was good", "parameters": {"function_to_apply": "none"}}
        )
        top = await client.post("/predict", json={"inputs": "the movie was good", "parameters": {"top_k": 1}})
        sigmoid = await client.post("/predict", json={"inputs": "good", "parameters": {"function_to_apply": "sigmoid"}})
        both = await client.post(
            "/predict", json={"inputs": "good", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}}
        )
        zero = await client.post("/predict", json={"inputs": "good", "parameters": {"top_k": 0}})
        unknown = await client.post("/predict", json={"inputs": "good", "parameters": {"temperature": 2}})
    assert [p["label"] for p in raw] == [p["label"] for p in plain]
    assert [math.exp(p["score"]) for p in raw] == pytest.approx([p["score"] for p in plain])
    assert none.json() == raw
    assert top.json() == plain[:1]
    for refused in (sigmoid, both, zero, unknown):
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation", refused.text
    assert "sigmoid" in sigmoid.json()["error"]


async def test_truncate_null_means_auto_truncate_and_direction_is_validated(engine: Engine) -> None:
    long_text = "good " * 60  # 62 tokens; the tiny model takes 48
    async with serving(make_app(engine)) as client:
        auto = await client.post("/predict", json={"inputs": long_text, "truncate": None})
        refused = await client.post("/predict", json={"inputs": long_text, "truncate": False})
        sides = [
            await client.post("/predict", json={"inputs": long_text, "truncation_direction": side})
            for side in ("left", "Left", "right", "Right")
        ]
        middle = await client.post("/predict", json={"inputs": long_text, "truncation_direction": "middle"})
    assert auto.status_code == 200
    assert refused.status_code == 422 and refused.json()["error_type"] == "input_too_long"
    assert [s.status_code for s in sides] == [200] * 4
    assert middle.status_code == 422 and middle.json()["error_type"] == "validation"


async def test_truncation_direction_reaches_the_tokenizer(tmp_path: Path) -> None:
    engine = tiny_engine(write_word_vocab(tmp_path))
    text = " ".join(["i love this cat"] + ["and the movie was very dull"] * 10)  # 66 tokens, over 48
    right, left = (engine.tokenize([text], None, True, side)[0] for side in ("right", "left"))
    assert right.input_ids[1:5] == engine.tokenizer.convert_tokens_to_ids(["i", "love", "this", "cat"])  # type: ignore[attr-defined]
    assert left.input_ids[-3:-1] == engine.tokenizer.convert_tokens_to_ids(["very", "dull"])  # type: ignore[attr-defined]
    assert left.input_ids != right.input_ids
    expected = {}
    for side, encoded in (("right", right), ("left", left)):
        engine.run_batch([encoded], [0.0], lambda _row, outcome, side=side: expected.__setitem__(side, outcome))
    async with serving(make_app(engine)) as client:
        for side in ("right", "left"):
            body = {"inputs": text, "truncation_direction": side, "raw_scores": True}
            answer = await client.post("/predict", json=body, headers={"X-Exit-Threshold": "0"})
            scores = {p["label"]: math.exp(p["score"]) for p in answer.json()}
            assert [scores[label] for label in engine.labels] == pytest.approx(expected[side].probabilities, rel=1e-5)


async def test_tei_headers_in_whole_milliseconds_and_early_exit_headers(engine: Engine) -> None:
    texts = ["the movie was good", "dull"]
    async with serving(make_app(engine)) as client:
        response = await client.post("/", json={"inputs": [[t] for t in texts]}, headers={"X-Exit-Threshold": HUGE})
    headers = response.headers
    assert headers["x-compute-type"] == "cpu"
    for name in TEI_HEADERS:
        assert headers[name].isdigit(), (name, headers[name])
    assert int(headers["x-total-time"]) >= int(headers["x-inference-time"])
    assert int(headers["x-compute-characters"]) == sum(map(len, texts))
    assert int(headers["x-compute-tokens"]) == sum(map(len, engine.tokenize(texts, None, True)))
    assert headers["X-Exit-Layer"] == "1" and headers["X-Layers-Executed"] == "2"


async def test_info_describes_the_classifier_and_the_limits(engine: Engine) -> None:
    async with serving(make_app(engine, max_texts_per_request=8, max_batch_size=4, max_queue_size=100)) as client:
        info = (await client.get("/info")).json()
    assert info["model_id"] == "tiny-bert" and info["model_dtype"] == "float32"
    assert info["model_type"] == {
        "classifier": {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}
    }
    assert info["max_input_length"] == 48 and info["max_client_batch_size"] == 8
    assert info["max_batch_requests"] == 4 and info["max_batch_tokens"] == 4 * 48
    assert info["max_concurrent_requests"] == 100 and info["auto_truncate"] is True
    assert isinstance(info["version"], str) and info["version"]


async def test_health_routes_are_503_until_ready_and_while_draining(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    warmed = threading.Event()
    real_warmup = engine.warmup

    def slow_warmup(batches: bool = True) -> None:
        assert warmed.wait(10)
        real_warmup(batches)

    engine.warmup = slow_warmup  # type: ignore[method-assign]
    app = make_app(engine, warmup=True)
    routes = ("/health", "/", "/ping")
    async with serving(app, wait_ready=False) as client:
        before = [await client.get(path) for path in routes]
        warmed.set()
        await app.state.deebert.preparing
        after = [await client.get(path) for path in routes]
        app.state.deebert.draining = True
        draining = [await client.get(path) for path in routes]
        app.state.deebert.draining = False
    assert [r.status_code for r in before] == [503] * 3 and before[0].json()["error_type"] == "not_ready"
    assert [r.status_code for r in after] == [200] * 3
    assert [r.json()["error_type"] for r in draining] == ["shutting_down"] * 3


async def test_method_not_allowed_names_every_method_of_the_path(engine: Engine) -> None:
    async with serving(make_app(engine)) as client:
        root = await client.put("/", json={"inputs": "good"})
        predict = await client.get("/predict")
    # `/` has a route per method (TEI's predict and health): Allow lists both, as RFC 9110 asks.
    assert root.status_code == 405 and root.headers["Allow"] == "GET, POST"
    assert root.json()["error_type"] == "method_not_allowed"
    assert predict.status_code == 405 and predict.headers["Allow"] == "POST"


async def test_the_api_key_guards_tei_inference_but_not_its_health(engine: Engine) -> None:
    async with serving(make_app(engine, api_key="s3cret")) as client:
        refused = [await client.post(path, json={"inputs": "good"}) for path in ("/", "/predict", "/invocations")]
        allowed = await client.post("/", json={"inputs": "good"}, headers={"Authorization": "Bearer s3cret"})
        health = await client.get("/health")
    assert [r.status_code for r in refused] == [401] * 3
    assert allowed.status_code == 200 and health.status_code == 200


# --- a real TEI client against a real server -----------------------------------------------------


@pytest.fixture
def live_url(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import huggingface_hub.constants

    # Offline mode (CI sets HF_HUB_OFFLINE=1, so nothing reaches the Hub) blocks every request the library
    # makes, loopback included; these clients talk only to the local server.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with uvicorn_serving(make_app(tiny_engine(tokenizer_dir), max_wait_ms=5.0)) as url:
        yield url


def test_huggingface_hub_inference_client(live_url: str) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=live_url, provider="hf-inference")
    text = "the movie was good"
    expected = httpx.post(f"{live_url}/predict", json={"inputs": text}, timeout=10).json()
    # Against TEI, the library returns the first (highest-scoring) prediction of the list it gets back.
    top = client.text_classification(text)
    assert top.label == expected[0]["label"]
    assert_same_answer(top.score, expected[0]["score"])
    assert client.text_classification(text, top_k=1).label == expected[0]["label"]
    info = client.get_endpoint_info()
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert client.health_check() is True


def test_huggingface_hub_async_inference_client(live_url: str) -> None:
    from huggingface_hub import AsyncInferenceClient

    texts = ["the movie was good", "awful and boring", "i love this cat", "dull", "great fun", "a man said"]
    expected = [httpx.post(f"{live_url}/predict", json={"inputs": t}, timeout=10).json()[0] for t in texts]

    async def classify_all() -> list[Any]:
        client = AsyncInferenceClient(model=live_url, provider="hf-inference")
        # Concurrently, so that the server batches them (5 ms batching window).
        return await asyncio.gather(*(client.text_classification(text) for text in texts))

    answers = asyncio.run(classify_all())
    # Batched by the server against each alone: labels exactly, scores within the cross-shape tolerance.
    assert_same_answer([[a.label, a.score] for a in answers], [[e["label"], e["score"]] for e in expected])
