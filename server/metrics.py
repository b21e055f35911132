"""Every Prometheus metric of the server, in one registry per app instance.

`deebert_layers_executed_total` counts Σ exit layer over samples and `deebert_layers_possible_total`
counts n per sample, so over any window `1 - rate(executed) / rate(possible)` is exactly the paper's
expected saving 1 - Σ i·N_i / (n·Σ N_i).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

# The expected saving from (Σ exit layers, n per text): the engine's, i.e. model/saving.py's one definition.
Saving = Callable[[float, float], float | None]

# The *_created series double every counter on the page and no query here needs them.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENTROPY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0, 1.5, 2.0)
THRESHOLD_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0, 2.0)


class Metrics:
    """The server's metrics; `record_*` methods are the only writers."""

    def __init__(
        self,
        num_layers: int,
        model_name: str,
        labels: list[str],
        saving: Saving,
        runtime: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._saving = saving
        self.num_layers = num_layers
        r = self.registry
        self.requests = Counter(
            "deebert_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "deebert_request_duration_seconds",
            "Time from request start to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "deebert_queue_duration_seconds",
            "Time a text waited before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "deebert_inference_duration_seconds",
            "Time from batch start to a text's exit",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "deebert_batch_size",
            "Texts per batch taken from the queue (texts of unlike lengths may run as several calls)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.exit_layer = Histogram(
            "deebert_exit_layer",
            "Layer (1..n) at which each text exited",
            buckets=tuple(range(1, num_layers + 1)),
            registry=r,
        )
        self.exit_entropy = Histogram(
            "deebert_exit_entropy", "Off-ramp entropy (nats) at exit", buckets=ENTROPY_BUCKETS, registry=r
        )
        self.request_threshold = Histogram(
            "deebert_request_threshold", "Entropy threshold applied per text", buckets=THRESHOLD_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("deebert_queue_depth", "Texts waiting for a batch", registry=r)
        self.inflight = Gauge("deebert_inflight_requests", "Requests being handled", registry=r)
        self.saving_ratio = Gauge(
            "deebert_expected_saving_ratio",
            "Expected saving since start: 1 - layers executed / layers possible",
            registry=r,
        )
        self.samples = Counter("deebert_samples", "Texts classified", registry=r)
        self.layers_executed = Counter("deebert_layers_executed", "Sum of exit layers over texts (Σ i·N_i)", registry=r)
        self.layers_possible = Counter(
            "deebert_layers_possible", "Layers a full-depth pass would run (n per text)", registry=r
        )
        self.degraded = Counter(
            "deebert_degraded", "Requests answered at the brownout threshold (X-Exit-Degraded: true)", registry=r
        )
        self.brownout_active = Gauge(
            "deebert_brownout_active", "1 while brownout raises the threshold of unpinned requests", registry=r
        )
        self.exit_agreement = Counter(
            "deebert_exit_agreement",
            "Shadow-sampled texts whose early-exit label equals the full-depth label (agree=true) or not",
            ["agree"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "deebert_shadow_dropped", "Shadow-sampled texts dropped because the shadow queue was full", registry=r
        )
        # Both label values from the start, so rate() over them exists before the first disagreement.
        for agree in ("true", "false"):
            self.exit_agreement.labels(agree=agree)
        self.controller_threshold = Gauge(
            "deebert_controller_threshold",
            "The default threshold now (requests that pin none get it); moved by the controller when targets are set",
            registry=r,
        )
        self.controller_agreement = Gauge(
            "deebert_controller_agreement",
            "Estimated agreement with the full model at the default threshold, over the newest `window` shadow "
            "samples, with its interval (bound=estimate|lower|upper)",
            ["window", "bound"],
            registry=r,
        )
        self.controller_adjustments = Counter(
            "deebert_controller_adjustments",
            "Moves of the default threshold by the controller, by reason",
            ["reason"],
            registry=r,
        )
        self.controller_p99 = Gauge(
            "deebert_controller_p99_seconds",
            "p99 request time the latency target is judged on (NaN: too few requests)",
            registry=r,
        )
        self.controller_target = Gauge(
            "deebert_controller_target",
            "The controller's targets: agreement (share), p99_seconds, agreement_floor (share)",
            ["target"],
            registry=r,
        )
        self.info = Info("deebert_model", "The served model", registry=r)
        self.info.info({"model": model_name, "num_layers": str(num_layers), "labels": ",".join(labels)})
        self.runtime = Info(
            "deebert_runtime", "Where the model runs: device, dtype (precision), backend, memory allocator", registry=r
        )
        self.runtime.info(runtime or {})
        self._executed = 0
        self._possible = 0

    def record_request(self, route: str, status: int, seconds: float | None) -> None:
        """One HTTP request answered: its route template, status and duration."""
        self.requests.labels(route=route, status=str(status)).inc()
        if seconds is not None:
            self.request_duration.labels(route=route).observe(seconds)

    def record_inflight(self, change: int) -> None:
        """An inference request started (+1) or ended (-1)."""
        self.inflight.inc(change)

    def record_batch(self, size: int) -> None:
        """One batch of `size` texts started (one call, or a few over texts of like length)."""
        self.batch_size.observe(size)

    def record_queue_depth(self, depth: int) -> None:
        """Texts waiting for a batch, now."""
        self.queue_depth.set(depth)

    def record_exit(self, exit_layer: int, entropy: float, threshold: float, queue_s: float, compute_s: float) -> None:
        """One text answered: its exit layer, entropy, threshold and timings."""
        self.exit_layer.observe(exit_layer)
        self.exit_entropy.observe(entropy)
        self.request_threshold.observe(threshold)
        self.queue_duration.observe(queue_s)
        self.inference_duration.observe(compute_s)
        self.samples.inc()
        self.layers_executed.inc(exit_layer)
        self.layers_possible.inc(self.num_layers)
        self._executed += exit_layer
        self._possible += self.num_layers
        self.saving_ratio.set(self._saving(self._executed, self._possible) or 0.0)

    def record_degraded(self) -> None:
        """One request answered at the brownout threshold."""
        self.degraded.inc()

    def record_brownout(self, active: bool) -> None:
        """Brownout turned on or off."""
        self.brownout_active.set(int(active))

    def record_shadow_dropped(self) -> None:
        """One shadow sample dropped because the shadow queue was full."""
        self.shadow_dropped.inc()

    def record_agreement(self, agree: bool) -> None:
        """One shadow-sampled text: did its early-exit label equal the full-depth label?"""
        self.exit_agreement.labels(agree="true" if agree else "false").inc()

    def record_controller_targets(self, targets: dict[str, float | None], reasons: list[str]) -> None:
        """The controller's targets (unset ones left out), and every adjustment reason at 0."""
        for name, value in targets.items():
            if value is not None:
                self.controller_target.labels(target=name).set(value)
        for reason in reasons:
            self.controller_adjustments.labels(reason=reason)

    def record_controller(
        self, threshold: float, agreement: dict[int, tuple[float, float, float]], p99_s: float | None
    ) -> None:
        """The controller's state now: the default threshold, agreement (estimate, lower, upper) per window
        with samples, and the p99 it judges latency on."""
        self.controller_threshold.set(threshold)
        for window, bounds in agreement.items():
            for bound, value in zip(("estimate", "lower", "upper"), bounds, strict=True):
                self.controller_agreement.labels(window=str(window), bound=bound).set(value)
        self.controller_p99.set(float("nan") if p99_s is None else p99_s)

    def record_adjustment(self, reason: str) -> None:
        """The controller moved the default threshold."""
        self.controller_adjustments.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)  # type: ignore[no-any-return]
