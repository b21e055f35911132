"""What a load run records, and what its report reads: per-request records, the run's outcome, Prometheus
samples. The generator (`loadtest.generator`) fills them; the report (`loadtest.report`) computes from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtest.generator import LoadConfig

DROPPED = "dropped_by_client"
EXECUTED_COUNTER = "deebert_layers_executed_total"
POSSIBLE_COUNTER = "deebert_layers_possible_total"
_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Sample:
    """One series of a Prometheus text page."""

    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Samples of a Prometheus text-format page; comments and lines that are not samples are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if match is None:
            continue
        name, label_text, value_text = match.groups()
        try:
            value = float(value_text)
        except ValueError:
            continue
        labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', label_text or ""))
        samples.append(Sample(name, labels, value))
    return samples


def metric_total(samples: Iterable[Sample], name: str) -> float | None:
    """Sum of every series named `name` (over all label sets); None when the page has none."""
    values = [s.value for s in samples if s.name == name]
    return sum(values) if values else None


@dataclass
class RequestRecord:
    """What one request did, as the report needs it."""

    status: str
    latency_s: float
    texts: int
    threshold: str | None
    exit_layers: list[int] = field(default_factory=list)
    num_layers: int | None = None
    total_ms: float | None = None
    compute_ms: float | None = None
    queue_ms: float | None = None
    error_detail: str | None = None
    sent_at: float | None = None  # perf_counter() of the (scheduled) send: per-window statistics of long runs
    retry_after: str | None = None  # the Retry-After header of a refusal

    @property
    def ok(self) -> bool:
        return self.status == "200"


@dataclass
class RunResult:
    """Raw outcome of a run: the records plus what the report computes from."""

    config: LoadConfig
    records: list[RequestRecord]
    duration_s: float
    dropped: int
    max_schedule_lag_s: float
    schedule_span_s: float
    metrics_before: list[Sample] | None
    metrics_after: list[Sample] | None
    model_info: dict[str, Any] | None
