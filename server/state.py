"""What every route shares (`ServerState`, kept in `app.state.deebert`), and how its parts are wired together."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from server.batcher import Batcher, Row, RowAnswer
from server.brownout import Brownout
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
                    metrics.record_shadow_dropped()

        batcher = self.batcher = Batcher(
            engine.run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue_size=self.settings.max_queue_size,
            on_depth=metrics.record_queue_depth,
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
    return Brownout(
        settings.brownout_queue_wait_ms / 1000, ceiling, metrics.record_brownout if metrics is not None else None
    )
