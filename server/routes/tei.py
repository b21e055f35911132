"""text-embeddings-inference's HTTP API for a classifier, so that TEI clients work unchanged.

    POST /, /predict, /invocations (SageMaker)   classify (`inputs`, `truncate`, `truncation_direction`, `raw_scores`)
    GET /info                                    the model and the server's limits, in TEI's Info shape
    GET /health, / and /ping (SageMaker)         200 when ready, else 503

Where the answers must differ from TEI's (a pair sent to a single-sentence model, raw scores, early-exit
headers), the README's TEI table says how.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server import pipeline
from server.engine import Engine, TruncationSide
from server.errors import ErrorType, openapi_errors
from server.protocol import TEI_HEALTH_PATHS, TEI_INFO_PATH, TEI_PREDICT_PATHS
from server.routes.dependencies import (
    INFERENCE_ERRORS,
    State,
    ThresholdHeader,
    require_api_key,
    require_api_key_for_health,
)
from server.schemas import (
    ClassifierInfo,
    HealthStatus,
    PredictRequest,
    PredictScore,
    TeiInfo,
    TeiModelType,
)
from server.state import ServerState
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["text-embeddings-inference"])

# What `truncate: null` means here: texts over the max length are truncated (TEI's --auto-truncate).
AUTO_TRUNCATE = True
# A probability from the float32 softmax that underflowed to 0 was below float32's smallest positive value.
SMALLEST_PROBABILITY = 1.401298464324817e-45


@dataclass(frozen=True)
class Reply:
    """How to write the predictions: one list or a batch of lists; which scores; how many labels."""

    batched: bool
    log_probabilities: bool
    top_k: int | None
    multi_label: bool = False  # scores are per-label sigmoids; raw scores are then the logits


async def predict(
    request: Request, body: PredictRequest, state: State, x_exit_threshold: ThresholdHeader = None
) -> Response:
    """Every label with its score, highest first; for a batch, one such list per input."""
    return await respond(state, request, body, x_exit_threshold)


async def respond(state: ServerState, request: Request, body: PredictRequest, x_exit_threshold: str | None) -> Response:
    """The answer to a validated request: the route's work, shared with the direct lane (`routes.direct`)."""
    started = time.perf_counter()
    engine, _ = state.serving()
    job, reply = decode(body, x_exit_threshold, engine)
    answer = await pipeline.answer(state, request, job, started)
    return JSONResponse(encode(answer, engine.labels, reply), headers=headers(answer, engine))


for path, operation in zip(TEI_PREDICT_PATHS, ("predict", "predict_root", "invocations"), strict=True):
    router.add_api_route(
        path,
        predict,
        methods=["POST"],
        operation_id=operation,
        response_model=list[PredictScore] | list[list[PredictScore]],
        responses=INFERENCE_ERRORS,
        dependencies=[Depends(require_api_key)],
        summary="Classify, in text-embeddings-inference's request and response shape",
    )


def decode(body: PredictRequest, x_exit_threshold: str | None, engine: Engine) -> tuple[pipeline.Job, Reply]:
    """TEI's `inputs` read for this model (texts, or pairs on a pair model), and how to reply."""
    texts, pairs, batched = body.normalized(pair_model=engine.is_pair_task)
    reply = Reply(
        batched,
        body.log_probabilities(engine.is_multi_label),
        body.parameters.top_k if body.parameters is not None else None,
        engine.is_multi_label,
    )
    truncate = body.truncate if body.truncate is not None else AUTO_TRUNCATE
    side: TruncationSide = "left" if body.truncation_direction.lower() == "left" else "right"
    return pipeline.Job(texts, pairs, None, x_exit_threshold, truncate, side), reply


def encode(answer: pipeline.Answer, labels: list[str], reply: Reply) -> list[Any]:
    """Per input, every label (or the top k) with its score, highest first."""
    scored = [predictions(o.probabilities, labels, reply) for o in answer.outcomes]
    return scored if reply.batched else scored[0]


def predictions(probabilities: list[float], labels: list[str], reply: Reply) -> list[dict[str, Any]]:
    """One input's labels and scores, sorted by score descending (ties keep the labels' order)."""
    scores = probabilities
    if reply.log_probabilities and reply.multi_label:  # the sigmoids' logits, log(p / (1 - p))
        scores = [
            math.log(max(p, SMALLEST_PROBABILITY)) - math.log(max(1 - p, SMALLEST_PROBABILITY)) for p in probabilities
        ]
    elif reply.log_probabilities:
        scores = [math.log(max(p, SMALLEST_PROBABILITY)) for p in probabilities]
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    return [{"score": score, "label": label} for score, label in ranked[: reply.top_k]]


def headers(answer: pipeline.Answer, engine: Engine) -> dict[str, str]:
    """TEI's headers, in whole milliseconds as TEI writes them, and early exit's."""
    total = _ms(answer.total_s())
    return {
        "x-compute-type": "gpu" if engine.device.type == "cuda" else "cpu",
        "x-compute-time": total,
        "x-compute-characters": str(answer.characters),
        "x-compute-tokens": str(answer.tokens),
        "x-total-time": total,
        "x-tokenization-time": _ms(answer.tokenization_s),
        "x-queue-time": _ms(statistics.fmean(answer.queue_s)),
        "x-inference-time": _ms(statistics.fmean(answer.inference_s)),
        **pipeline.early_exit_headers(answer),
    }


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


@router.get(
    TEI_INFO_PATH,
    response_model=TeiInfo,
    responses=openapi_errors(ErrorType.NOT_READY),
    summary="The served model and the server's limits, in text-embeddings-inference's Info shape",
)
async def info(state: State) -> TeiInfo:
    engine, _ = state.serving()
    settings = state.settings
    return TeiInfo(
        model_id=engine.name,
        model_dtype=engine.dtype_name,
        served_model_name=engine.name,
        model_type=TeiModelType(
            classifier=ClassifierInfo(
                id2label={str(i): label for i, label in enumerate(engine.labels)},
                label2id={label: i for i, label in enumerate(engine.labels)},
            )
        ),
        max_concurrent_requests=settings.max_queue_size,
        max_input_length=engine.max_length,
        max_batch_tokens=settings.max_batch_size * engine.max_length,
        max_batch_requests=settings.max_batch_size,
        max_client_batch_size=settings.max_texts_per_request,
        auto_truncate=AUTO_TRUNCATE,
        version=_version(),
    )


def _version() -> str:
    try:
        return metadata.version("deebert")
    except metadata.PackageNotFoundError:  # run from a checkout without installing it
        return "unknown"


async def health(state: State) -> HealthStatus:
    """200 once the model is warmed up; 503 before, and while draining."""
    state.serving()
    return HealthStatus(status="ready")


for path, operation in zip(TEI_HEALTH_PATHS, ("health", "health_root", "ping"), strict=True):
    router.add_api_route(
        path,
        health,
        methods=["GET"],
        operation_id=operation,
        response_model=HealthStatus,
        dependencies=[Depends(require_api_key_for_health)],
        responses=openapi_errors(ErrorType.UNAUTHORIZED, ErrorType.NOT_READY, ErrorType.SHUTTING_DOWN),
        summary="Readiness, at text-embeddings-inference's health routes",
    )
