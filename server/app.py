"""The HTTP app: `create_app` and its lifespan (load, warm up, serve, drain).

Data flows one way: HTTP → schemas → batcher → engine → model, and answers come back up the same way.
Where the rest lives: the routes in `server/routes/` (one module per group) over the one request pipeline
(`pipeline`); what they share in `state`; errors → responses in `error_handlers`; body limit, request
metrics and the last-resort 500 in `middleware`; duplicate-key-free JSON in `strict_json`. A well-formed POST to
an inference route is answered by `routes.direct`'s lane through the route's own `respond`, without FastAPI's
routing and dependency solving; every other request, and any the lane cannot take as it is, goes to FastAPI.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.engine import Engine
from server.error_handlers import install_error_handlers
from server.errors import ErrorType, openapi_errors
from server.memory import release_freed_memory
from server.middleware import ServingMiddleware, UnexpectedErrorMiddleware
from server.routes import classify, health, model_info, tei
from server.routes.direct import DirectLane
from server.settings import ServerSettings
from server.state import ServerState, build_state, save_controller_state, steer_default_threshold
from server.strict_json import StrictJsonRoute

logger = logging.getLogger("deebert.server")


def create_app(settings: ServerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; the model loads and warms up in the background, readiness tells when it is done."""
    state = ServerState(settings or ServerSettings(), engine=engine)
    app = FastAPI(
        title="deebert",
        summary="Text classification with DeeBERT early exiting",
        version="0.1.0",
        lifespan=lifespan,
        responses=openapi_errors(ErrorType.INTERNAL),
    )
    app.router.route_class = StrictJsonRoute
    app.state.deebert = state
    install_error_handlers(app)
    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(DirectLane, state=state)  # type: ignore[arg-type]  # innermost: after the body limit
    app.add_middleware(ServingMiddleware, state=state)  # type: ignore[arg-type]
    app.add_middleware(UnexpectedErrorMiddleware)  # type: ignore[arg-type]
    for group in (classify, tei, model_info, health):
        # The routes themselves rather than `include_router`: recent FastAPI includes a router lazily, matched
        # through one more layer on every request, and `app.routes` would no longer list the paths.
        app.router.routes.extend(group.router.routes)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Prepare the model in the background while serving; on shutdown, drain the accepted work."""
    state: ServerState = app.state.deebert
    state.preparing = asyncio.create_task(prepare(state))
    try:
        yield
    finally:
        state.draining = True
        state.ready = False
        if state.preparing is not None and not state.preparing.done():
            state.preparing.cancel()
        if state.housekeeping is not None:
            state.housekeeping.cancel()
        if state.steering is not None:
            state.steering.cancel()
            await asyncio.to_thread(save_controller_state, state)
        if state.batcher is not None:
            finished = await state.batcher.drain(state.settings.drain_timeout_s)
            if not finished:
                logger.warning("drain timed out after %.0f s; failing what is left", state.settings.drain_timeout_s)
            await state.batcher.stop()


async def prepare(state: ServerState) -> None:
    """Load (if needed) and warm up the engine off the event loop, then start batching and report ready."""
    try:
        engine = state.engine if state.engine is not None else await asyncio.to_thread(Engine.load, state.settings)
        build_state(state.settings, engine, state)
        assert state.batcher is not None
        if state.settings.warmup:
            # On the batch thread itself: a first forward on a fresh thread costs ~200 ms of one-off setup.
            await state.batcher.run_in_worker(engine.warmup)
            if state.batcher.loop_batches != "none":
                # This thread (the event loop's) runs batches too: lone texts only (`alone`), or every kind (`all`).
                engine.warmup(batches=state.batcher.loop_batches == "all")
        # Everything loaded so far lives as long as the process: move it out of the collector's sight, so
        # no request pays for a full collection over millions of long-lived objects (~200 ms here).
        gc.collect()
        gc.freeze()
        state.batcher.start()
        state.housekeeping = asyncio.create_task(
            release_freed_memory(state.batcher, state.settings.memory_trim_interval_s)
        )
        if state.controller is not None:
            state.steering = asyncio.create_task(steer_default_threshold(state))
        state.ready = True
        logger.info("ready: serving %s", engine.name)
    except Exception as err:
        state.load_error = str(err)
        logger.exception("model failed to load")
