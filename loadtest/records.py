"""What a load run records, and what its report reads: per-request records, the run's outcome, Prometheus
samples. The generator (`loadtest.generator`) fills them; the report (`loadtest.report`) computes from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from loadtest.generator import LoadConfig

DROPPED = "dropped_by_client"
EXECUTED_COUNTER = "deebert_layers_executed_total"
POSSIBLE_COUNTER = "deebert_layers_possible_total"
# The batcher's histogram of texts per batch: its _sum and _count give the mean batch size of a run.
BATCH_SIZE_SUM = "deebert_batch_size_sum"
BATCH_SIZE_COUNT = "deebert_batch_size_count"


def parse_metrics(text: str) -> list[Sample]:
    """Samples of a Prometheus text-format page (prometheus_client's parser); a page that is not valid
    exposition text (a server without metrics answering something else) gives none."""
    try:
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    except ValueError:
        return []


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
    tokenization_ms: float | None = None
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
