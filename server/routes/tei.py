"""`POST /predict`: classification in text-embeddings-inference's request and response shape."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server import pipeline
from server.errors import DeeBertError, ErrorType
from server.routes.classify import headers
from server.routes.dependencies import INFERENCE_ERRORS, State, ThresholdHeader, require_api_key
from server.schemas import PredictRequest, PredictScore
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["inference"])


@router.post(
    "/predict",
    response_model=list[PredictScore] | list[list[PredictScore]],
    responses=INFERENCE_ERRORS,
    dependencies=[Depends(require_api_key)],
    summary="Classify, in text-embeddings-inference's request and response shape",
)
async def predict(
    request: Request, body: PredictRequest, state: State, x_exit_threshold: ThresholdHeader = None
) -> Response:
    started = time.perf_counter()
    engine, _ = state.serving()
    texts, pairs, batched = body.normalized(pair_model=engine.is_pair_task)
    if engine.is_pair_task and pairs is None:
        raise DeeBertError(
            ErrorType.VALIDATION, "this model classifies sentence pairs: send text_pair / text_pairs too"
        )
    if not engine.is_pair_task and pairs is not None:
        raise DeeBertError(ErrorType.VALIDATION, "this model classifies single texts: leave out text_pair / text_pairs")
    job = pipeline.Job(texts, pairs, None, x_exit_threshold, body.truncate)
    answer = await pipeline.answer(state, request, job, started)
    labels = engine.labels
    scored = [
        [{"label": labels[i], "score": p} for i, p in sorted(enumerate(o.probabilities), key=lambda ip: -ip[1])]
        for o in answer.outcomes
    ]
    return JSONResponse(scored if batched else scored[0], headers=headers(answer))
