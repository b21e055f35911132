"""When a latency–throughput curve is saturated, and the throughput it sustained (bench and reliability)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A point with more errors than this does not count as sustained throughput.
MAX_ERROR_RATE = 0.01


# Saturated: achieved below this share of the offered rate, or p99 this many times the first point's.
SATURATION_SHARE = 0.9


P99_BLOWUP = 10.0


def is_saturated(point: dict[str, Any], first: dict[str, Any]) -> bool:
    """Achieved under 90% of the offered rate, too many errors, or p99 ten times the first point's."""
    offered = point.get("arrival_rps") or point.get("offered_rps") or 0.0
    if point["throughput_rps"] < SATURATION_SHARE * offered or point["error_rate"] > MAX_ERROR_RATE:
        return True
    p99, first_p99 = point["latency_ms"]["p99"], first["latency_ms"]["p99"]
    return p99 is not None and first_p99 is not None and p99 > P99_BLOWUP * first_p99


def saturated_throughput(points: Sequence[dict[str, Any]]) -> float | None:
    """The most requests/s any point sustained with few errors."""
    good = [p["throughput_rps"] for p in points if p["error_rate"] <= MAX_ERROR_RATE and p["requests_ok"] > 0]
    return max(good) if good else None


def sustained(curve: dict[str, Any] | None) -> float | None:
    """A curve's saturated throughput: the most requests/s any of its points sustained with few errors.

    On a small machine the in-process client competes with the server, and open-loop arrivals past the
    knee cost the client more than closed-loop clients do, so the closed-loop point often sustains more;
    both figures are printed beside it.
    """
    if curve is None:
        return None
    values = [v for v in (curve["saturated_rps_open"], curve["saturated_rps_closed"]) if v is not None]
    return max(values) if values else None
