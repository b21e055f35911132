"""`POST /v1/classify`: our own API, with every early-exit field."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server import pipeline
from server.engine import Engine
from server.errors import DeeBertError, ErrorType
from server.protocol import (
    CLASSIFY_PATH,
    COMPUTE_TIME_HEADER,
    QUEUE_TIME_HEADER,
    TOKENIZATION_TIME_HEADER,
    TOTAL_TIME_HEADER,
)
from server.routes.dependencies import INFERENCE_ERRORS, State, ThresholdHeader, require_api_key
from server.schemas import ClassifyRequest, ClassifyResponse
from server.state import ServerState
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["inference"])


@router.post(
    CLASSIFY_PATH,
    response_model=ClassifyResponse,
    responses=INFERENCE_ERRORS,
    dependencies=[Depends(require_api_key)],
    summary="Classify texts with early exit",
)
async def classify(
    request: Request, body: ClassifyRequest, state: State, x_exit_threshold: ThresholdHeader = None
) -> Response:
    return await respond(state, request, body, x_exit_threshold)


async def respond(
    state: ServerState, request: Request, body: ClassifyRequest, x_exit_threshold: str | None
) -> Response:
    """The answer to a validated request: the route's work, shared with the direct lane (`routes.direct`)."""
    started = time.perf_counter()
    engine, _ = state.serving()
    answer = await pipeline.answer(state, request, decode(body, x_exit_threshold, engine), started)
    return JSONResponse(encode(answer, engine, body.return_probabilities), headers=headers(answer))


def decode(body: ClassifyRequest, x_exit_threshold: str | None, engine: Engine) -> pipeline.Job:
    """The body's texts (and pairs), checked against what the model classifies."""
    texts, pairs = body.normalized()
    if engine.is_pair_task and pairs is None:
        raise DeeBertError(
            ErrorType.VALIDATION, "this model classifies sentence pairs: send text_pair / text_pairs too"
        )
    if not engine.is_pair_task and pairs is not None:
        raise DeeBertError(ErrorType.VALIDATION, "this model classifies single texts: leave out text_pair / text_pairs")
    return pipeline.Job(texts, pairs, body.threshold, x_exit_threshold, body.truncate)


def encode(answer: pipeline.Answer, engine: Engine, return_probabilities: bool) -> dict[str, Any]:
    """Per text in input order: label, label_id, score, exit_layer, entropy (and every label's probability)."""
    labels = engine.labels
    results = []
    for o in answer.outcomes:
        result: dict[str, Any] = {
            "label": labels[o.label_id],
            "label_id": o.label_id,
            "score": o.probabilities[o.label_id],
            "exit_layer": o.exit_layer,
            "entropy": o.entropy,
        }
        if return_probabilities or engine.is_multi_label:
            result["probabilities"] = dict(zip(labels, o.probabilities, strict=True))
        if engine.is_multi_label:
            result["labels_on"] = engine.labels_on(o.probabilities)
        results.append(result)
    return {
        "model": engine.name,
        "threshold": answer.threshold.value,
        "num_layers": engine.num_layers,
        "results": results,
    }


def headers(answer: pipeline.Answer) -> dict[str, str]:
    """Early exit's headers, and where the request's time went (ms, µs resolution): tokenizing its texts, the
    slowest text's queue and model time, and the total since the route began."""
    return {
        **pipeline.early_exit_headers(answer),
        TOKENIZATION_TIME_HEADER: f"{1000 * answer.tokenization_s:.3f}",
        QUEUE_TIME_HEADER: f"{1000 * max(answer.queue_s):.3f}",
        COMPUTE_TIME_HEADER: f"{1000 * max(answer.inference_s):.3f}",
        TOTAL_TIME_HEADER: f"{1000 * answer.total_s():.3f}",
    }
