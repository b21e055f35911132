"""`GET /v1/model`: the served model, its presets and the server's limits."""

from __future__ import annotations

from fastapi import APIRouter

from server.errors import ErrorType, openapi_errors
from server.protocol import MODEL_PATH
from server.routes.dependencies import State
from server.schemas import ControllerInfo, ModelInfo
from server.strict_json import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["model"])


@router.get(MODEL_PATH, response_model=ModelInfo, responses=openapi_errors(ErrorType.NOT_READY))
async def model_info(state: State) -> ModelInfo:
    engine, batcher = state.serving()
    default = state.default_threshold(engine)
    controller = state.controller
    return ModelInfo(
        model=engine.name,
        task="text-pair-classification" if engine.is_pair_task else "text-classification",
        multi_label=engine.is_multi_label,
        labels=engine.labels,
        num_layers=engine.num_layers,
        max_length=engine.max_length,
        pooling=engine.config.pooling,
        exit_criterion=engine.config.exit_criterion,
        default_threshold=default.value,
        default_threshold_name=default.preset,
        presets=engine.presets,  # type: ignore[arg-type]
        device=str(engine.device),
        dtype=engine.dtype_name,
        backend=engine.backend,
        backend_reason=engine.backend_reason,
        max_batch_size=state.settings.max_batch_size,
        max_texts_per_request=state.settings.max_texts_per_request,
        batches_on_loop=batcher.loop_batches,
        batch_streams=batcher.streams,
        controller=ControllerInfo.model_validate(controller.snapshot()) if controller is not None else None,
    )
