"""Probes and scrapes: `GET /health/live`, `GET /health/ready`, `GET /metrics`.

They need the API key only when DEEBERT_API_KEY_HEALTH / DEEBERT_API_KEY_METRICS say so.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from server.errors import ErrorType, openapi_errors
from server.protocol import LIVE_PATH, METRICS_PATH, READY_PATH
from server.routes.dependencies import State, require_api_key_for_health, require_api_key_for_metrics
from server.schemas import HealthStatus
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["health"])


@router.get(
    LIVE_PATH,
    response_model=HealthStatus,
    dependencies=[Depends(require_api_key_for_health)],
    responses=openapi_errors(ErrorType.UNAUTHORIZED),
)
async def live() -> HealthStatus:
    return HealthStatus(status="alive")


@router.get(
    READY_PATH,
    response_model=HealthStatus,
    dependencies=[Depends(require_api_key_for_health)],
    responses=openapi_errors(ErrorType.UNAUTHORIZED, ErrorType.NOT_READY, ErrorType.SHUTTING_DOWN),
)
async def ready(state: State) -> HealthStatus:
    state.serving()
    return HealthStatus(status="ready")


@router.get(
    METRICS_PATH,
    response_class=Response,
    dependencies=[Depends(require_api_key_for_metrics)],
    responses=openapi_errors(ErrorType.UNAUTHORIZED),
    summary="Prometheus metrics",
)
async def metrics(state: State) -> Response:
    if state.brownout is not None and state.batcher is not None:
        # Brownout's state moves on request arrival; a scrape of an idle server must not see a stale 1.
        state.brownout.update(state.batcher.queue_wait_s, drained=not state.batcher.busy)
    body = state.metrics.render() if state.metrics is not None else b"# model loading\n"
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
