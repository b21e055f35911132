"""What every route shares (`ServerState`, kept in `app.state.deebert`), and `build_state`, which wires a loaded
engine into it: metrics, brownout, the controller and its shadow sampling, the batcher."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.batcher import Batcher, Row, RowAnswer
from server.brownout import Brownout
from server.controller import Adjustment, Reason, Targets, ThresholdController
from server.engine import Engine, RowOutcome, Threshold
from server.errors import DeeBertError, ErrorType
from server.memory import loaded_allocator
from server.metrics import Metrics
from server.settings import ServerSettings
from server.shadow import ShadowSampler

logger = logging.getLogger("deebert.server")


@dataclass
class ServerState:
    """Everything the routes share: settings, engine, batcher, metrics, and the lifecycle flags."""

    settings: ServerSettings
    engine: Engine | None = None
    batcher: Batcher | None = None
    metrics: Metrics | None = None
    brownout: Brownout[Threshold] | None = None
    controller: ThresholdController | None = None
    ladder: list[Threshold] = field(default_factory=list)  # the controller's rungs
    ready: bool = False
    draining: bool = False
    inference_in_flight: int = 0  # inference requests between the middleware's start and end
    # Requests the HTTP server has read the head of and not finished, whether or not their task has reached the
    # app yet (`serve` counts uvicorn's request tasks; 0 under another server, e.g. the tests' in-process client).
    accepted_requests: Callable[[], int] = field(default=lambda: 0, repr=False)
    load_error: str | None = None
    preparing: asyncio.Task[None] | None = field(default=None, repr=False)
    housekeeping: asyncio.Task[None] | None = field(default=None, repr=False)
    steering: asyncio.Task[None] | None = field(default=None, repr=False)

    def default_threshold(self, engine: Engine) -> Threshold:
        """The threshold of a request that pins none: the controller's rung now, else the configured default."""
        if self.controller is None:
            return engine.default_threshold
        return self.ladder[self.controller.rung]

    def serving(self) -> tuple[Engine, Batcher]:
        """The engine and batcher, or 503 while loading, warming up or draining."""
        if self.draining:
            raise DeeBertError(ErrorType.SHUTTING_DOWN, "the server is shutting down; retry on another replica")
        if not self.ready or self.engine is None or self.batcher is None:
            detail = f": {self.load_error}" if self.load_error else "; retry shortly"
            raise DeeBertError(ErrorType.NOT_READY, f"the model is not ready yet{detail}", {"Retry-After": "1"})
        return self.engine, self.batcher


def build_state(settings: ServerSettings, engine: Engine, state: ServerState | None = None) -> ServerState:
    """Wire a loaded engine into what the routes share (vLLM's `init_app_state` is the model): the metrics, brownout,
    the controller with its ladder and shadow sampling, and the batcher that feeds the engine. `state` is filled
    in when given (the app keeps one from its start, to answer 503 while the model loads), else made."""
    state = state if state is not None else ServerState(settings)
    runtime = {
        "device": str(engine.device),
        "dtype": engine.dtype_name,
        "backend": engine.backend,
        "backend_reason": engine.backend_reason,
        "allocator": loaded_allocator(),
        "batches_on_loop": settings.batches_on_loop,
        "batch_streams": str(engine.streams),
    }
    metrics = Metrics(engine.num_layers, engine.name, engine.labels, engine.saving_from_totals, runtime)
    brownout = make_brownout(settings, engine, metrics)
    controller, ladder = make_controller(settings, engine, metrics) or (None, [])
    shadow = make_shadow(settings, engine, metrics, controller)
    recorder = AnswerRecorder(metrics, shadow)
    batcher = Batcher(
        engine.run_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_depth=metrics.record_queue_depth,
        on_batch=metrics.record_batch,
        on_answer=recorder,
        idle_runner=shadow.compare if shadow is not None else None,
        max_idle_items=settings.max_queue_size,
        loop_batches=settings.batches_on_loop,
        in_flight=lambda: requests_in_flight(state),
        # (On a GPU the forward pass does not stream the weights through the CPU's caches: nothing to re-warm.)
        on_quiet=engine.rewarm if settings.rewarm_when_idle and engine.device.type == "cpu" else None,
        stream_runner=functools.partial(engine.run_batch, stream=True) if engine.streams > 1 else None,
        streams=engine.streams,
    )
    recorder.queue_idle = batcher.submit_idle  # the shadow's re-runs go to the batcher's idle queue
    state.engine, state.metrics, state.brownout, state.batcher = engine, metrics, brownout, batcher
    state.controller, state.ladder = controller, ladder
    metrics.record_controller(state.default_threshold(engine).value, {}, None)
    return state


def requests_in_flight(state: ServerState) -> int:
    """Requests in the server now, for the batcher's choice to run a lone text at once on the event loop.

    The middleware's count alone misses requests whose bodies have arrived but whose tasks have not run yet: a
    burst read in one turn of the loop makes one task per request, and each then runs from the middleware to the
    batcher without yielding, so each saw itself alone, ran at once and answered before the next task started.
    Once in that state (entered after a lone request, e.g. a warm-up), a server under 32 connections ran every
    text as a batch of one: 0.7x the requests/s of batches (BENCHMARKS.md §23). uvicorn's own count of request
    tasks sees the whole burst."""
    return max(state.inference_in_flight, state.accepted_requests())


@dataclass
class AnswerRecorder:
    """What happens as each text is answered: its metrics, and with shadow sampling, a full-depth re-run of a
    sample of them queued for the batcher's idle time (`queue_idle`, set once the batcher exists)."""

    metrics: Metrics
    shadow: ShadowSampler | None
    queue_idle: Callable[[list[Any]], bool] = field(default=lambda items: False)

    def __call__(self, row: Row, answer: RowAnswer) -> None:
        outcome: RowOutcome = answer.value
        self.metrics.record_exit(outcome.exit_layer, outcome.entropy, row.threshold, answer.queue_s, answer.compute_s)
        if self.shadow is not None:
            job = self.shadow.sample(row.item, outcome.exit_layer, outcome.label_id)
            if job is not None and not self.queue_idle([job]):
                self.metrics.record_shadow_dropped()


def make_shadow(
    settings: ServerSettings, engine: Engine, metrics: Metrics, controller: ThresholdController | None
) -> ShadowSampler | None:
    """Shadow sampling (full-depth re-runs of a share of the answered texts) when the settings ask for it; with a
    controller, each re-run also reads every rung of its ladder."""
    fraction = settings.effective_shadow_fraction
    if fraction <= 0:
        return None
    return ShadowSampler(
        fraction,
        engine.num_layers,
        engine.full_depth_labels,
        metrics.record_agreement,
        ladder_evidence=functools.partial(engine.ladder_exits, ladder=controller.ladder)
        if controller is not None
        else None,
        on_evidence=controller.record_evidence if controller is not None else None,
    )


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
    return Brownout(
        settings.brownout_queue_wait_ms / 1000, ceiling, metrics.record_brownout if metrics is not None else None
    )


# The controller's pace, in controller intervals (0.5 s by default): raise the default no sooner than 10 after
# the last move (5 s), and give back one latency rung per 4 (2 s) once load has fallen.
DWELL_INTERVALS = 10
RECOVER_INTERVALS = 4


def make_controller(
    settings: ServerSettings, engine: Engine, metrics: Metrics
) -> tuple[ThresholdController, list[Threshold]] | None:
    """The threshold controller the targets ask for, with its ladder; None without targets."""
    targets = Targets(
        agreement=settings.target_agreement,
        p99_s=None if settings.target_p99_ms is None else settings.target_p99_ms / 1000,
        agreement_floor=settings.agreement_floor,
    )
    if not targets.any:
        return None
    try:
        ceiling = engine.resolve_threshold(settings.controller_ceiling, "DEEBERT_CONTROLLER_CEILING")
        ladder = engine.threshold_ladder(ceiling)
    except (DeeBertError, ValueError) as err:
        message = err.message if isinstance(err, DeeBertError) else str(err)
        raise ValueError(f"controller: {message}") from None
    default = engine.default_threshold
    values = [rung.value for rung in ladder]
    if default.value in values:
        start = values.index(default.value)
    else:  # the default exits earlier than the ceiling
        start = len(ladder) - 1
        logger.warning(
            "controller: the default %s exits earlier than the ceiling %s; starting at the ceiling",
            default.value,
            ceiling.value,
        )

    def on_change(adjustment: Adjustment) -> None:
        metrics.record_adjustment(adjustment.reason.value)

    interval = settings.controller_interval_s
    controller = ThresholdController(
        values,
        start,
        targets,
        engine.num_layers,
        min_dwell_s=DWELL_INTERVALS * interval,
        recover_s=RECOVER_INTERVALS * interval,
        saving=engine.saving_from_totals,
        on_change=on_change,
    )
    metrics.record_controller_targets(
        {
            "agreement": targets.agreement,
            "p99_seconds": targets.p99_s,
            "agreement_floor": targets.floor if targets.p99_s is not None else None,  # it only bounds latency
        },
        [reason.value for reason in Reason],
    )
    if settings.controller_state:
        controller.resume(Path(settings.controller_state), engine.name, engine.config.exit_criterion)
    aims = [f"agreement {targets.agreement}"] if targets.agreement is not None else []
    if targets.p99_s is not None:
        aims.append(f"p99 {settings.target_p99_ms:g} ms (agreement floor {targets.floor})")
    logger.info(
        "controller: targets %s; default %.4f moves within %.4f..%.4f (%d rungs)",
        ", ".join(aims),
        controller.threshold,
        values[0],
        values[-1],
        len(values),
    )
    return controller, ladder


# Without a move, the controller's state is saved this often (its evidence grows in between).
STATE_SAVE_INTERVAL_S = 30.0


async def steer_default_threshold(state: ServerState) -> None:
    """Every controller interval: let the controller look at its evidence, publish what it sees, and keep its
    state file up to date (on every move, and every STATE_SAVE_INTERVAL_S)."""
    controller, batcher, metrics = state.controller, state.batcher, state.metrics
    assert controller is not None and batcher is not None and metrics is not None
    path = Path(state.settings.controller_state) if state.settings.controller_state else None
    saved_at = time.monotonic()
    while True:
        await asyncio.sleep(state.settings.controller_interval_s)
        moves = controller.tick(batcher.queue_wait_s)
        agreement = {
            window: (interval.estimate, interval.lower, interval.upper)
            for window, interval in controller.intervals(controller.rung).items()
        }
        metrics.record_controller(controller.threshold, agreement, controller.p99_s)
        if path is not None and (moves or time.monotonic() - saved_at > STATE_SAVE_INTERVAL_S):
            await asyncio.to_thread(save_controller_state, state)
            saved_at = time.monotonic()


def save_controller_state(state: ServerState) -> None:
    """Write the controller's state file, if one is configured (a failure is logged, never raised)."""
    if state.controller is None or state.engine is None or not state.settings.controller_state:
        return
    path, engine = Path(state.settings.controller_state), state.engine
    try:
        state.controller.save(path, engine.name, engine.config.exit_criterion)
    except OSError as err:
        logger.warning("controller state not saved to %s: %s", state.settings.controller_state, err)
