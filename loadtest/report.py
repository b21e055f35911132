"""The load generator's report: numbers from the raw records (a dict, JSON-ready) and a terminal table."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.records import (
    BATCH_SIZE_COUNT,
    BATCH_SIZE_SUM,
    DROPPED,
    EXECUTED_COUNTER,
    POSSIBLE_COUNTER,
    RequestRecord,
    RunResult,
    Sample,
    metric_total,
)
from model.saving import exit_counts, saving_from_counts, saving_from_totals
from reports.common import number, percent
from reports.terminal import key_values


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds (None for no values)."""
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ms = [1000 * s for s in seconds]
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": max(ms),
        "mean": sum(ms) / len(ms),
    }


def _mean_p50(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None}
    return {"mean": sum(values) / len(values), "p50": float(np.percentile(values, 50))}


def server_timing(records: Sequence[RequestRecord]) -> dict[str, dict[str, float | None]]:
    """Mean and p50 of the server's X-Total-Time, X-Compute-Time, X-Queue-Time, X-Tokenization-Time, total minus
    compute (the overhead), and what the overhead has besides tokenizing and queueing (ms): the hand-offs between
    the event loop and the model's thread, metrics, the threshold and the JSON answer."""
    total = [r.total_ms for r in records if r.total_ms is not None]
    compute = [r.compute_ms for r in records if r.compute_ms is not None]
    queue = [r.queue_ms for r in records if r.queue_ms is not None]
    tokenization = [r.tokenization_ms for r in records if r.tokenization_ms is not None]
    # Overhead per request, not difference of means: a p50 of differences is what "overhead at p50" means.
    overhead = [r.total_ms - r.compute_ms for r in records if r.total_ms is not None and r.compute_ms is not None]
    rest = [
        r.total_ms - r.compute_ms - r.tokenization_ms - r.queue_ms
        for r in records
        if r.total_ms is not None
        and r.compute_ms is not None
        and r.tokenization_ms is not None
        and r.queue_ms is not None
    ]
    return {
        "total_ms": _mean_p50(total),
        "compute_ms": _mean_p50(compute),
        "queue_ms": _mean_p50(queue),
        "tokenization_ms": _mean_p50(tokenization),
        "overhead_ms": _mean_p50(overhead),
        "overhead_rest_ms": _mean_p50(rest),
    }


def _metric_changes(
    before: list[Sample] | None, after: list[Sample] | None, names: Sequence[str]
) -> list[float] | None:
    """How much each metric of `names` changed between two /metrics scrapes; None without both scrapes, or where
    either page lacks one of them."""
    if before is None or after is None:
        return None
    changes = []
    for name in names:
        first, last = metric_total(before, name), metric_total(after, name)
        if first is None or last is None:
            return None
        changes.append(last - first)
    return changes


def metrics_saving(before: list[Sample] | None, after: list[Sample] | None) -> dict[str, float | None]:
    """1 - Δexecuted/Δpossible from two /metrics scrapes; None where the server has no such counters."""
    result: dict[str, float | None] = {"layers_executed": None, "layers_possible": None, "expected_saving": None}
    changes = _metric_changes(before, after, (EXECUTED_COUNTER, POSSIBLE_COUNTER))
    if changes is None:
        return result
    executed, possible = changes
    result["layers_executed"], result["layers_possible"] = executed, possible
    result["expected_saving"] = saving_from_totals(executed, possible)
    return result


def metrics_batch_size(before: list[Sample] | None, after: list[Sample] | None) -> float | None:
    """Mean texts per batch the server ran between two /metrics scrapes; None without the histogram or batches.
    A saturated server running batches of one (BENCHMARKS.md §23) shows here."""
    changes = _metric_changes(before, after, (BATCH_SIZE_SUM, BATCH_SIZE_COUNT))
    if changes is None:
        return None
    texts, batches = changes
    return texts / batches if batches > 0 else None


def _counts(records: Sequence[RequestRecord], num_layers: int) -> list[int]:
    return exit_counts((layer for record in records for layer in record.exit_layers), num_layers)


def _arrival_rate(result: RunResult) -> float | None:
    """Open loop: the rate the seeded schedule actually offered (a short Poisson run strays from --rate)."""
    config = result.config
    if config.mode != "open":
        return None
    arrivals = len(result.records) + result.dropped
    # Count-bounded runs end at their last arrival; the others at the end of the window.
    if config.requests is not None and arrivals >= config.requests:
        window = result.schedule_span_s
    else:
        window = config.duration or result.schedule_span_s
    return arrivals / window if window > 0 else None


def build_report(result: RunResult) -> dict[str, Any]:
    """Every number of a run, JSON-ready: throughput, latency, errors, exit layers, savings, server timing."""
    config, records = result.config, result.records
    ok = [r for r in records if r.ok]
    errors: Counter[str] = Counter(r.status for r in records if not r.ok)
    if result.dropped:
        errors[DROPPED] += result.dropped
    error_examples = {}
    for record in records:
        if not record.ok and record.status not in error_examples:
            error_examples[record.status] = record.error_detail
    layers = [r.num_layers for r in ok if r.num_layers is not None]
    num_layers = max([*layers, *(max(r.exit_layers, default=0) for r in ok)], default=0)
    counts = _counts(ok, num_layers) if num_layers else []
    from_metrics = metrics_saving(result.metrics_before, result.metrics_after)
    duration = result.duration_s
    texts_ok = sum(r.texts for r in ok)
    thresholds = sorted({r.threshold for r in records}, key=lambda t: (t is None, str(t)))
    per_threshold = {}
    for threshold in thresholds:
        chosen = [r for r in ok if r.threshold == threshold]
        group_counts = _counts(chosen, num_layers) if num_layers else []
        per_threshold[str(threshold) if threshold is not None else "server default"] = {
            "requests_ok": len(chosen),
            "latency_ms": latency_summary([r.latency_s for r in chosen]),
            "expected_saving": saving_from_counts(group_counts),
        }
    model = result.model_info or {}
    return {
        "url": config.url,
        "label": config.label,
        "mode": config.mode,
        "rate": config.rate,
        "concurrency": config.concurrency if config.mode == "closed" else None,
        "threshold": config.threshold if config.threshold is not None else "server default",
        "texts_per_request": config.texts_per_request,
        "seed": config.seed,
        "requests_limit": config.requests,
        "duration_limit_s": config.duration,
        "model": model.get("model"),
        "requests_sent": len(records),
        "requests_ok": len(ok),
        "dropped_by_client": result.dropped,
        "texts_sent": sum(r.texts for r in records),
        "texts_ok": texts_ok,
        "duration_s": duration,
        "offered_rps": config.rate,
        "arrival_rps": _arrival_rate(result),
        "throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "texts_per_s": texts_ok / duration if duration > 0 else 0.0,
        "error_rate": (len(records) - len(ok) + result.dropped) / max(1, len(records) + result.dropped),
        "latency_ms": latency_summary([r.latency_s for r in ok]),
        "errors": dict(sorted(errors.items())),
        "error_examples": error_examples,
        "num_layers": num_layers or None,
        "exit_counts": counts,
        "expected_saving": saving_from_counts(counts),
        "metrics_expected_saving": from_metrics["expected_saving"],
        "metrics_layers_executed": from_metrics["layers_executed"],
        "metrics_layers_possible": from_metrics["layers_possible"],
        "metrics_mean_batch_size": metrics_batch_size(result.metrics_before, result.metrics_after),
        "server_timing": server_timing(ok),
        "per_threshold": per_threshold,
        "max_schedule_lag_ms": 1000 * result.max_schedule_lag_s if config.mode == "open" else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """A terminal table of the report's main numbers."""
    latency = report["latency_ms"]
    timing = report["server_timing"]
    load = (
        f"open loop, {report['rate']:g} req/s"
        if report["mode"] == "open"
        else f"closed loop, {report['concurrency']} clients"
    )
    rows = [
        ("load", load),
        ("threshold", str(report["threshold"])),
        ("requests ok / sent", f"{report['requests_ok']} / {report['requests_sent']}"),
        ("duration", number(report["duration_s"], 2, " s")),
        ("throughput", f"{number(report['throughput_rps'], 1)} req/s, {number(report['texts_per_s'], 1)} texts/s"),
        (
            "latency p50/p90/p99/max",
            " / ".join(number(latency[k], 2) for k in ("p50", "p90", "p99", "max")) + " ms",
        ),
        (
            "server total / compute / overhead (p50)",
            " / ".join(number(timing[k]["p50"], 3) for k in ("total_ms", "compute_ms", "overhead_ms")) + " ms",
        ),
        (
            "overhead: tokenizing / queue / rest (p50)",
            " / ".join(number(timing[k]["p50"], 3) for k in ("tokenization_ms", "queue_ms", "overhead_rest_ms"))
            + " ms",
        ),
        ("errors", ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"),
        ("exit layers (1..n)", " ".join(str(c) for c in report["exit_counts"]) or "-"),
        ("expected saving (responses)", percent(report["expected_saving"])),
        ("expected saving (/metrics)", percent(report["metrics_expected_saving"], missing="no /metrics")),
        ("texts per batch (/metrics)", number(report.get("metrics_mean_batch_size"), 1)),
    ]
    if report["mode"] == "open":
        rows.append(("max schedule lag", number(report["max_schedule_lag_ms"], 2, " ms")))
    return key_values(rows)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the report as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
