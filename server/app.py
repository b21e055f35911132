"""The HTTP app: `create_app`, its lifespan, the routes, and the one place errors become responses.

Data flows one way: HTTP → schemas → batcher → engine → model, and answers come back up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.batcher import Batcher, Row, RowAnswer
from server.brownout import Brownout
from server.engine import Engine, RowOutcome, Threshold
from server.errors import DeeBertError, ErrorType, openapi_errors
from server.memory import loaded_allocator, release_freed_memory
from server.metrics import Metrics
from server.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    HealthStatus,
    ModelInfo,
    PredictRequest,
    PredictScore,
)
from server.settings import ServerSettings
from server.shadow import ShadowSampler

logger = logging.getLogger("deebert.server")

INFERENCE_ROUTES = ("/v1/classify", "/predict")
THRESHOLD_HEADER = "X-Exit-Threshold"
DEGRADED_HEADER = "X-Exit-Degraded"
# Requests with more text than this are tokenized in a worker thread; short ones inline (a thread hop
# costs more than tokenizing them).
OFF_LOOP_TOKENIZE_CHARS = 20_000
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class ServerState:
    """Everything the routes share: settings, engine, batcher, metrics, and the lifecycle flags."""

    settings: ServerSettings
    engine: Engine | None = None
    batcher: Batcher | None = None
    metrics: Metrics | None = None
    brownout: Brownout[Threshold] | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    preparing: asyncio.Task[None] | None = field(default=None, repr=False)
    housekeeping: asyncio.Task[None] | None = field(default=None, repr=False)

    def attach(self, engine: Engine) -> None:
        """Wire the metrics and the batcher to a loaded engine."""
        self.engine = engine
        runtime = {
            "device": str(engine.device),
            "dtype": engine.dtype_name,
            "backend": engine.backend,
            "allocator": loaded_allocator(),
        }
        metrics = Metrics(engine.num_layers, engine.name, engine.labels, runtime)
        self.metrics = metrics

        self.brownout = make_brownout(self.settings, engine, metrics)
        shadow = (
            ShadowSampler(
                self.settings.shadow_fraction, engine.num_layers, engine.full_depth_labels, metrics.record_agreement
            )
            if self.settings.shadow_fraction > 0
            else None
        )

        def on_answer(row: Row, answer: RowAnswer) -> None:
            outcome: RowOutcome = answer.value
            metrics.record_exit(outcome.exit_layer, outcome.entropy, row.threshold, answer.queue_s, answer.compute_s)
            if shadow is not None:
                job = shadow.sample(row.item, outcome.exit_layer, outcome.label_id)
                if job is not None and not batcher.submit_idle([job]):
                    metrics.shadow_dropped.inc()

        batcher = self.batcher = Batcher(
            engine.run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue_size=self.settings.max_queue_size,
            on_depth=metrics.queue_depth.set,
            on_batch=metrics.record_batch,
            on_answer=on_answer,
            idle_runner=shadow.compare if shadow is not None else None,
            max_idle_items=self.settings.max_queue_size,
        )

    def serving(self) -> tuple[Engine, Batcher]:
        """The engine and batcher, or 503 while loading, warming up or draining."""
        if self.draining:
            raise DeeBertError(ErrorType.SHUTTING_DOWN, "the server is shutting down; retry on another replica")
        if not self.ready or self.engine is None or self.batcher is None:
            detail = f": {self.load_error}" if self.load_error else "; retry shortly"
            raise DeeBertError(ErrorType.NOT_READY, f"the model is not ready yet{detail}", {"Retry-After": "1"})
        return self.engine, self.batcher


def make_brownout(
    settings: ServerSettings, engine: Engine, metrics: Metrics | None = None
) -> Brownout[Threshold] | None:
    """The brownout controller the settings ask for; None when off or when the ceiling would not exit earlier."""
    if settings.brownout_queue_wait_ms is None:
        return None
    try:
        ceiling = engine.resolve_threshold(settings.brownout_threshold, "DEEBERT_BROWNOUT_THRESHOLD")
    except DeeBertError as err:
        raise ValueError(err.message) from None
    if not engine.exits_earlier(ceiling, engine.default_threshold):
        logger.warning(
            "brownout off: its threshold %s does not exit earlier than the default %s",
            ceiling.value,
            engine.default_threshold.value,
        )
        return None
    on_change = (lambda active: metrics.brownout_active.set(int(active))) if metrics is not None else None
    return Brownout(settings.brownout_queue_wait_ms / 1000, ceiling, on_change)


# --- errors → HTTP, the one place ------------------------------------------------------------------


def error_response(err: DeeBertError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(request: Request, exc: RequestValidationError) -> DeeBertError:
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if isinstance(exc.__cause__, DuplicateKeyError):
        return DeeBertError(ErrorType.DUPLICATE_KEY, exc.__cause__.msg)
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx: dict[str, Any] = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
        return DeeBertError(
            ErrorType.MALFORMED_JSON, f"request body is not valid JSON ({ctx.get('error', 'parse error')})"
        )
    if request.method == "POST" and not _is_json(content_type):
        sent = f"not {content_type[:80]!r}" if content_type else "none was sent"
        return DeeBertError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE, f"send the body as JSON with Content-Type: application/json ({sent})"
        )
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return DeeBertError(ErrorType.EMPTY_INPUT, 'request body is empty; send a JSON object such as {"text": "..."}')
    if any("threshold" in map(str, e.get("loc", ())) for e in errors):
        return DeeBertError(ErrorType.INVALID_THRESHOLD, "threshold must be a number >= 0 or a preset name")
    parts = []
    for e in errors[:3]:
        location = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return DeeBertError(ErrorType.VALIDATION, "; ".join(parts) + more)


def _is_json(content_type: str) -> bool:
    main = content_type.split(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DeeBertError)
    async def _deebert(_: Request, exc: DeeBertError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(DeeBertError(ErrorType.NOT_FOUND, f"no route {request.url.path}"))
        if exc.status_code == 405:
            error = DeeBertError(ErrorType.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")
            return JSONResponse(error.body(), status_code=405, headers=dict(exc.headers or {}))
        if exc.status_code == 400:
            # FastAPI's own 400: a body that is not UTF-8, or JSON nested too deeply to parse.
            return error_response(
                DeeBertError(ErrorType.MALFORMED_JSON, "request body could not be parsed: send UTF-8 JSON")
            )
        kind = ErrorType.INTERNAL if exc.status_code >= 500 else ErrorType.VALIDATION
        return JSONResponse(DeeBertError(kind, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(DeeBertError(ErrorType.INTERNAL, "internal error; the server logged the details"))


# --- JSON bodies: a key given twice is refused, not silently overwritten ---------------------------


class DuplicateKeyError(json.JSONDecodeError):
    """A JSON object names the same key twice (at any depth); json.loads would keep the last one silently."""


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_with_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Called by the C parser once per object; normal bodies hold one object, so this costs ~1 µs a request.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj


def parse_json_body(body: bytes) -> Any:
    """`json.loads`, except that an object with a repeated key raises DuplicateKeyError naming the key."""
    try:
        return json.loads(body, object_pairs_hook=_object_with_unique_keys)
    except _RepeatedKey as repeated:
        key = repeated.key if len(repeated.key) <= 60 else repeated.key[:60] + "..."
        message = f"duplicate key {key!r} in a JSON object; give each key once"
        raise DuplicateKeyError(message, body.decode("utf-8", "replace"), 0) from None


class StrictJsonRequest(Request):
    """A request whose JSON body is parsed by `parse_json_body` (FastAPI turns its errors into validation errors)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Routes whose handlers see a `StrictJsonRequest`; the body is still parsed exactly once."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler


# --- middleware: body limit, request metrics, in-flight gauge --------------------------------------


class ServingMiddleware:
    """Pure ASGI: refuses bodies over the limit before parsing, and counts requests by route and status."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        path = scope.get("path", "")
        metrics = self.state.metrics
        inference = path in INFERENCE_ROUTES
        if inference and metrics is not None:
            metrics.inflight.inc()

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    limit = DeeBertError(
                        ErrorType.PAYLOAD_TOO_LARGE, f"request body exceeds {self.state.settings.max_body_bytes} bytes"
                    )
                    await error_response(limit)(scope, receive, send_recording)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_recording)
        finally:
            if metrics is not None:
                if inference:
                    metrics.inflight.dec()
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                metrics.record_request(label, status, time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.state.settings.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                with contextlib.suppress(ValueError):
                    if int(value) > limit:
                        return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- the app -------------------------------------------------------------------------------------


async def prepare(state: ServerState) -> None:
    """Load (if needed) and warm up the engine off the event loop, then start batching and report ready."""
    try:
        engine = state.engine if state.engine is not None else await asyncio.to_thread(Engine.load, state.settings)
        state.attach(engine)
        assert state.batcher is not None
        if state.settings.warmup:
            # On the batch thread itself: a first forward on a fresh thread costs ~200 ms of one-off setup.
            await state.batcher.run_in_worker(engine.warmup)
        # Everything loaded so far lives as long as the process: move it out of the collector's sight, so
        # no request pays for a full collection over millions of long-lived objects (~200 ms here).
        gc.collect()
        gc.freeze()
        state.batcher.start()
        state.housekeeping = asyncio.create_task(
            release_freed_memory(state.batcher, state.settings.memory_trim_interval_s)
        )
        state.ready = True
        logger.info("ready: serving %s", engine.name)
    except Exception as err:
        state.load_error = str(err)
        logger.exception("model failed to load")


def create_app(settings: ServerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; the model loads and warms up in the background, readiness tells when it is done."""
    settings = settings or ServerSettings()
    state = ServerState(settings, engine=engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
            if state.batcher is not None:
                finished = await state.batcher.drain(settings.drain_timeout_s)
                if not finished:
                    logger.warning("drain timed out after %.0f s; failing what is left", settings.drain_timeout_s)
                await state.batcher.stop()

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
    app.add_middleware(ServingMiddleware, state=state)  # type: ignore[arg-type]
    add_routes(app, state)
    return app


def add_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, one hop per request.
    async def require_api_key(authorization: str | None = Header(None, include_in_schema=False)) -> None:
        expected = settings.api_key
        if expected is None:
            return
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise DeeBertError(
                ErrorType.UNAUTHORIZED,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )

    inference_errors = openapi_errors(
        ErrorType.MALFORMED_JSON,
        ErrorType.DUPLICATE_KEY,
        ErrorType.UNAUTHORIZED,
        ErrorType.TOO_MANY_TEXTS,
        ErrorType.UNSUPPORTED_MEDIA_TYPE,
        ErrorType.VALIDATION,
        ErrorType.EMPTY_INPUT,
        ErrorType.INPUT_TOO_LONG,
        ErrorType.INVALID_THRESHOLD,
        ErrorType.UNKNOWN_PRESET,
        ErrorType.PAYLOAD_TOO_LARGE,
        ErrorType.OVERLOADED,
        ErrorType.NOT_READY,
        ErrorType.SHUTTING_DOWN,
    )
    threshold_header = Header(
        None,
        alias=THRESHOLD_HEADER,
        description="threshold for this request, of the model's exit criterion (DeeBERT entropy: a number >= 0, "
        "0 = full depth) or a preset name; the body's "
        "`threshold` wins over it",
    )

    async def answer(
        request: Request, texts: list[str], pairs: list[str] | None, threshold: Threshold, truncate: bool, pinned: bool
    ) -> tuple[list[RowOutcome], dict[str, str], Threshold]:
        """Tokenize, queue, and wait for every text's answer; timing headers in milliseconds.

        Returns the threshold actually applied: under brownout, an unpinned request gets the ceiling."""
        started = time.perf_counter()
        engine, batcher = state.serving()
        if len(texts) > settings.max_texts_per_request:
            raise DeeBertError(
                ErrorType.TOO_MANY_TEXTS,
                f"{len(texts)} texts in one request; the maximum is {settings.max_texts_per_request}",
            )
        if engine.is_pair_task and pairs is None:
            raise DeeBertError(
                ErrorType.VALIDATION, "this model classifies sentence pairs: send text_pair / text_pairs too"
            )
        if not engine.is_pair_task and pairs is not None:
            raise DeeBertError(
                ErrorType.VALIDATION, "this model classifies single texts: leave out text_pair / text_pairs"
            )
        batcher.check_room(len(texts))  # refuse before tokenizing: under overload a 429 must be cheap
        characters = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs else 0)
        if characters > OFF_LOOP_TOKENIZE_CHARS:
            # Long inputs take the tokenizer (which releases the GIL) hundreds of ms: not on the event loop.
            encoded = await asyncio.to_thread(engine.encode, texts, pairs, truncate)
        else:
            encoded = engine.encode(texts, pairs, truncate)
        degraded = None
        if state.brownout is not None:
            degraded = state.brownout.threshold_for(pinned, batcher.queue_wait_s, drained=not batcher.busy)
            if degraded is not None:
                threshold = degraded
        futures = batcher.submit(encoded, [threshold.value] * len(encoded))
        answers = await _wait_or_disconnect(request, futures)
        outcomes = [a.value for a in answers]
        headers = {
            "X-Exit-Layer": str(max(o.exit_layer for o in outcomes)),
            "X-Layers-Executed": str(sum(o.exit_layer for o in outcomes)),
            "X-Queue-Time": f"{1000 * max(a.queue_s for a in answers):.3f}",
            "X-Compute-Time": f"{1000 * max(a.compute_s for a in answers):.3f}",
            "X-Total-Time": f"{1000 * (time.perf_counter() - started):.3f}",
        }
        if degraded is not None:
            headers[DEGRADED_HEADER] = "true"
            if state.metrics is not None:
                state.metrics.record_degraded()
        return outcomes, headers, threshold

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=inference_errors,
        dependencies=[Depends(require_api_key)],
        summary="Classify texts with early exit",
        tags=["inference"],
    )
    async def classify(
        request: Request, body: ClassifyRequest, x_exit_threshold: str | None = threshold_header
    ) -> Response:
        engine, _ = state.serving()
        texts, pairs = body.normalized()
        if body.threshold is not None:
            threshold = engine.resolve_threshold(body.threshold, "body threshold")
        else:
            threshold = engine.resolve_threshold(x_exit_threshold, f"{THRESHOLD_HEADER} header")
        pinned = body.threshold is not None or x_exit_threshold is not None
        outcomes, headers, threshold = await answer(request, texts, pairs, threshold, body.truncate, pinned)
        labels = engine.labels
        results = []
        for o in outcomes:
            result: dict[str, Any] = {
                "label": labels[o.label_id],
                "label_id": o.label_id,
                "score": o.probabilities[o.label_id],
                "exit_layer": o.exit_layer,
                "entropy": o.entropy,
            }
            if body.return_probabilities:
                result["probabilities"] = dict(zip(labels, o.probabilities, strict=True))
            results.append(result)
        content = {
            "model": engine.name,
            "threshold": threshold.value,
            "num_layers": engine.num_layers,
            "results": results,
        }
        return JSONResponse(content, headers=headers)

    @app.post(
        "/predict",
        response_model=list[PredictScore] | list[list[PredictScore]],
        responses=inference_errors,
        dependencies=[Depends(require_api_key)],
        summary="Classify, in text-embeddings-inference's request and response shape",
        tags=["inference"],
    )
    async def predict(
        request: Request, body: PredictRequest, x_exit_threshold: str | None = threshold_header
    ) -> Response:
        engine, _ = state.serving()
        texts, pairs, batched = body.normalized(pair_model=engine.is_pair_task)
        threshold = engine.resolve_threshold(x_exit_threshold, f"{THRESHOLD_HEADER} header")
        pinned = x_exit_threshold is not None
        outcomes, headers, _ = await answer(request, texts, pairs, threshold, body.truncate, pinned)
        labels = engine.labels
        scored = [
            [{"label": labels[i], "score": p} for i, p in sorted(enumerate(o.probabilities), key=lambda ip: -ip[1])]
            for o in outcomes
        ]
        return JSONResponse(scored if batched else scored[0], headers=headers)

    @app.get("/v1/model", response_model=ModelInfo, responses=openapi_errors(ErrorType.NOT_READY), tags=["model"])
    async def model_info() -> ModelInfo:
        engine, _ = state.serving()
        return ModelInfo(
            model=engine.name,
            task="text-pair-classification" if engine.is_pair_task else "text-classification",
            labels=engine.labels,
            num_layers=engine.num_layers,
            max_length=engine.max_length,
            pooling=engine.config.pooling,
            exit_criterion=engine.config.exit_criterion,
            default_threshold=engine.default_threshold.value,
            default_threshold_name=engine.default_threshold.preset,
            presets=engine.presets,  # type: ignore[arg-type]
            device=str(engine.device),
            dtype=engine.dtype_name,
            backend=engine.backend,
            max_batch_size=settings.max_batch_size,
            max_texts_per_request=settings.max_texts_per_request,
        )

    # Health and metrics are exempt from the API key unless configured: probes and scrapers rarely hold secrets.
    def key_guard(required: bool) -> tuple[list[Any], tuple[ErrorType, ...]]:
        """A route's dependencies and documented errors: the API-key check and its 401, or nothing."""
        return ([Depends(require_api_key)], (ErrorType.UNAUTHORIZED,)) if required else ([], ())

    health_guard, health_errors = key_guard(settings.api_key_health)
    metrics_guard, metrics_errors = key_guard(settings.api_key_metrics)

    @app.get(
        "/health/live",
        response_model=HealthStatus,
        dependencies=health_guard,
        responses=openapi_errors(*health_errors),
        tags=["health"],
    )
    async def live() -> HealthStatus:
        return HealthStatus(status="alive")

    @app.get(
        "/health/ready",
        response_model=HealthStatus,
        dependencies=health_guard,
        responses=openapi_errors(*health_errors, ErrorType.NOT_READY, ErrorType.SHUTTING_DOWN),
        tags=["health"],
    )
    async def ready() -> HealthStatus:
        state.serving()
        return HealthStatus(status="ready")

    @app.get(
        "/metrics",
        response_class=Response,
        dependencies=metrics_guard,
        responses=openapi_errors(*metrics_errors),
        tags=["health"],
        summary="Prometheus metrics",
    )
    async def metrics() -> Response:
        if state.brownout is not None and state.batcher is not None:
            # Brownout's state moves on request arrival; a scrape of an idle server must not see a stale 1.
            state.brownout.update(state.batcher.queue_wait_s, drained=not state.batcher.busy)
        body = state.metrics.render() if state.metrics is not None else b"# model loading\n"
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _wait_or_disconnect(request: Request, futures: list[asyncio.Future[RowAnswer]]) -> list[RowAnswer]:
    """Wait for every row's answer; if the client disconnects first, cancel its rows (batch-mates go on)."""
    gathered: asyncio.Future[list[RowAnswer]] = asyncio.gather(*futures)
    disconnect: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
    waiting: set[asyncio.Future[Any]] = {gathered, disconnect}
    try:
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise
    finally:
        disconnect.cancel()
    if gathered in done:
        return list(gathered.result())
    for future in futures:
        future.cancel()
    gathered.cancel()
    with contextlib.suppress(asyncio.CancelledError, DeeBertError):
        await gathered
    raise DeeBertError(ErrorType.CLIENT_CLOSED_REQUEST, "the client disconnected before its answer")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
