"""What a reliability run's records say, and its PASS/FAIL checks: pure functions of a run's report
(`deebert reliability`; no server, no I/O)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from loadtest.records import RequestRecord
from reports.common import number, percent

Mode = Literal["overload", "soak"]
MODES: tuple[Mode, ...] = ("overload", "soak")
DEFAULT_DURATION: dict[Mode, float] = {"overload": 60.0, "soak": 600.0}

# RSS after the overload may be at most this much above its baseline; the soak may grow at most this much.
RSS_TOLERANCE = 0.05


# "As fast as before": the probe's p50 after the run within this factor of before, plus a little absolute
# slack for timer and scheduler noise at a few milliseconds.
PROBE_SLOWDOWN = 1.5


PROBE_SLACK_MS = 2.0


LOST_HINT = "connection errors and timeouts: requests that got no HTTP answer"


BOUND_FORMULA = "(max_queue_size / max_batch_size + 2) x full-batch service time at full depth"


def _is_status(status: str) -> bool:
    return status.isdigit()


def classify_records(records: Sequence[RequestRecord], client_dropped: int = 0) -> dict[str, Any]:
    """Sent, accepted (2xx), refused (429, and how many lacked Retry-After), failed (other statuses and
    unreadable 2xx bodies), lost (no HTTP answer: connection errors, timeouts), and p50/p99 of the accepted."""
    accepted = [r for r in records if _is_status(r.status) and 200 <= int(r.status) < 300]
    refused = [r for r in records if r.status == "429"]
    failed: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for r in records:
        if _is_status(r.status):
            if not 200 <= int(r.status) < 300 and r.status != "429":
                failed[r.status] += 1
        elif r.status == "bad_response":  # a 2xx whose body was not the documented shape
            failed[r.status] += 1
        else:
            lost[r.status] += 1
    latencies = [1000 * r.latency_s for r in accepted]
    return {
        "sent": len(records),
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_without_retry_after": sum(1 for r in refused if not r.retry_after),
        "failed": sum(failed.values()),
        "failed_by_status": dict(sorted(failed.items())),
        "server_errors_5xx": sum(n for s, n in failed.items() if s.isdigit() and int(s) >= 500),
        "lost": sum(lost.values()),
        "lost_by_kind": dict(sorted(lost.items())),
        "client_dropped": client_dropped,
        "latency_accepted_ms": latency_summary(latencies),
        # X-Total-Time: from the route taking the request to its answer (tokenize, queue, batch), the span
        # the queue bounds; the client's figure adds its own lag, the network and the server's accept backlog.
        "server_latency_accepted_ms": latency_summary([r.total_ms for r in accepted if r.total_ms is not None]),
    }


def latency_summary(ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of latencies in ms (all None for none)."""
    if not ms:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": max(ms),
    }


def latency_bound_ms(max_queue_size: int, max_batch_size: int, full_batch_ms: float) -> float:
    """The longest an accepted request can take: the batch already running when it is admitted, the Q/B full
    batches queued ahead of it, and its own batch, T each."""
    return (max_queue_size / max_batch_size + 2) * full_batch_ms


def windows(
    records: Sequence[RequestRecord],
    window_s: float,
    rss: Sequence[tuple[float, int]],
    start: float,
    duration_s: float | None = None,
) -> list[dict[str, Any]]:
    """Per window of `window_s` seconds from `start` (by send time): requests, errors, p50/p99, peak RSS.

    `rss` holds (perf_counter time, bytes) samples; records without a send time are skipped. With
    `duration_s`, whatever falls past the last window (the drain, a few ms of start-up offset) joins it.
    """
    if window_s <= 0:
        raise ValueError(f"window must be > 0 s, got {window_s}")
    last = max(1, math.ceil(duration_s / window_s)) - 1 if duration_s else None

    def index_of(when: float) -> int:
        index = max(0, int((when - start) // window_s))
        return index if last is None else min(index, last)

    buckets: dict[int, list[RequestRecord]] = {}
    for record in records:
        if record.sent_at is not None:
            buckets.setdefault(index_of(record.sent_at), []).append(record)
    rss_buckets: dict[int, list[int]] = {}
    for when, value in rss:
        rss_buckets.setdefault(index_of(when), []).append(value)
    result = []
    for index in range(max([*buckets, *rss_buckets], default=-1) + 1):
        chosen = buckets.get(index, [])
        counts = classify_records(chosen)
        samples = sorted(rss_buckets.get(index, []))
        peak = samples[-1] if samples else None
        median = samples[len(samples) // 2] if samples else None
        result.append(
            {
                "start_s": index * window_s,
                "end_s": (index + 1) * window_s,
                "sent": counts["sent"],
                "accepted": counts["accepted"],
                "errors": counts["sent"] - counts["accepted"],
                "p50_ms": counts["latency_accepted_ms"]["p50"],
                "p99_ms": counts["latency_accepted_ms"]["p99"],
                "server_p99_ms": counts["server_latency_accepted_ms"]["p99"],
                "rss_peak_mib": _mib(peak),
                "rss_median_mib": _mib(median),
            }
        )
    return result


def soak_rss_growth(window_list: Sequence[dict[str, Any]]) -> tuple[float | None, float | None, float | None]:
    """Median RSS (MiB) of the first and the last window that sampled it, and the growth between them."""
    sampled = [w["rss_median_mib"] for w in window_list if w.get("rss_median_mib") is not None]
    if not sampled:
        return None, None, None
    first, last = sampled[0], sampled[-1]
    return first, last, last / first - 1.0


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def ms_text(value: float | None) -> str:
    """A latency in ms as text (`12.3 ms`, `-` for none)."""
    return number(value, 1, " ms")


def _healthy_after(report: dict[str, Any]) -> dict[str, Any]:
    after = report["after"]
    probe = after["probe"]
    healthy = (
        after["ready_status"] == 200
        and probe["requests"] > 0
        and probe["ok"] == probe["requests"]
        and after["queue_depth"] == 0
        and after["inflight_requests"] == 0
    )
    return _check(
        "healthy after",
        healthy,
        f"/health/ready {after['ready_status']}, probe {probe['ok']}/{probe['requests']} answered 200, "
        f"queue depth {after['queue_depth']}, in flight {after['inflight_requests']}",
    )


def relative_growth(before: int | None, after: int | None) -> float | None:
    """(after − before) / before; None when either is unknown (or before is 0)."""
    return None if not before or after is None else (after - before) / before


def evaluate_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance checks of a run's report; each {name, passed, detail}."""
    mode: Mode = report["mode"]
    outcome = report["outcome"]
    bound = report["latency_bound"]["bound_ms"]
    p99 = outcome["server_latency_accepted_ms"]["p99"]
    client_p99 = outcome["latency_accepted_ms"]["p99"]
    checks = []
    if mode == "overload":
        checks.append(
            _check(
                "overload reached",
                outcome["refused"] > 0,
                f"{outcome['refused']} of {outcome['sent']} requests refused with 429 at "
                f"{report['load']['offered_rps']:.1f} req/s offered",
            )
        )
        checks.append(
            _check(
                "only 2xx and 429",
                outcome["failed"] == 0,
                f"{outcome['failed']} other answers {outcome['failed_by_status'] or ''}".rstrip(),
            )
        )
        checks.append(
            _check(
                "every 429 has Retry-After",
                outcome["refused_without_retry_after"] == 0,
                f"{outcome['refused_without_retry_after']} of {outcome['refused']} without it",
            )
        )
    else:
        errors = outcome["sent"] - outcome["accepted"]
        checks.append(
            _check(
                "no errors",
                errors == 0,
                f"{errors} of {outcome['sent']} not 2xx {outcome['failed_by_status'] or ''}".rstrip(),
            )
        )
    checks.append(_check("zero 5xx", outcome["server_errors_5xx"] == 0, f"{outcome['server_errors_5xx']} answers 5xx"))
    checks.append(
        _check("nothing lost", outcome["lost"] == 0, f"{outcome['lost']} lost {outcome['lost_by_kind'] or ''}".rstrip())
    )
    checks.append(
        _check(
            "every arrival sent",
            outcome["client_dropped"] == 0,
            f"{outcome['client_dropped']} arrivals dropped by the load generator itself (its in-flight limit)",
        )
    )
    checks.append(
        _check(
            "p99 within the queue bound",
            p99 is not None and bound is not None and p99 <= bound,
            f"server-side (X-Total-Time) p99 {ms_text(p99)} vs bound {ms_text(bound)}",
        )
    )
    lag_ms = 1000 * report["load"]["max_schedule_lag_s"]
    checks.append(
        _check(
            "client p99 within the bound plus the generator's lag",
            client_p99 is not None and bound is not None and client_p99 <= bound + lag_ms,
            f"p99 from the scheduled arrival {ms_text(client_p99)} vs {ms_text(bound)} + {lag_ms:.0f} ms; a gap to the "
            "server-side p99 is time before the route: the generator's own connection handling or the server's "
            "accept backlog",
        )
    )
    rss = report["rss"]
    if mode == "overload":
        growth = relative_growth(rss["before"], rss["after"])
        checks.append(
            _check(
                "RSS back to baseline",
                growth is not None and growth <= RSS_TOLERANCE,
                f"before {rss_text(rss['before'])}, peak {rss_text(rss['peak'])}, "
                f"after {report['settings']['idle']:g} s idle {rss_text(rss['after'])} "
                f"({growth_text(growth)}; at most +{100 * RSS_TOLERANCE:g}%)",
            )
        )
    else:
        first, last, growth = soak_rss_growth(report["windows"])
        checks.append(
            _check(
                "RSS growth under 5%",
                growth is not None and growth < RSS_TOLERANCE,
                f"median RSS {mib_text(first)} in the first window, {mib_text(last)} in the last "
                f"({growth_text(growth)}); "
                f"idle before the load {rss_text(rss['before'])}, end of load {rss_text(rss['end'])} "
                f"({growth_text(relative_growth(rss['before'], rss['end']))})",
            )
        )
        timed = [w for w in report["windows"] if w["server_p99_ms"] is not None]
        over = [w for w in timed if w["server_p99_ms"] > bound]
        checks.append(
            _check(
                "every window's p99 within the bound",
                bool(timed) and not over,
                f"{len(over)} of {len(timed)} windows over {ms_text(bound)}; worst server-side p99 "
                f"{ms_text(max((w['server_p99_ms'] for w in timed), default=None))}",
            )
        )
    checks.append(_healthy_after(report))
    before, after = report["before"]["probe"]["p50_ms"], report["after"]["probe"]["p50_ms"]
    fast = before is not None and after is not None and after <= PROBE_SLOWDOWN * before + PROBE_SLACK_MS
    checks.append(
        _check(
            "as fast after as before",
            fast,
            f"probe p50 {ms_text(before)} before, {ms_text(after)} after "
            f"(at most {PROBE_SLOWDOWN:g}x + {PROBE_SLACK_MS:g} ms)",
        )
    )
    return checks


def mib_text(value: float | None) -> str:
    """A size in MiB as text (`512.0 MiB`, `-` for none)."""
    return number(value, 1, " MiB")


def rss_text(value: int | None) -> str:
    """A size in bytes (an RSS sample) as MiB text."""
    return mib_text(_mib(value))


def growth_text(value: float | None) -> str:
    """A relative growth as a signed percentage (`+1.2%`)."""
    return percent(value, signed=True)
