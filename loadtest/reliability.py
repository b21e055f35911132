"""`deebert reliability`: does the server degrade predictably? Two runs against a real server, one report.

- **overload**: measure the saturated capacity (closed loop), then offer 3x that as open-loop Poisson
  arrivals for 60 s. Accepted: only 2xx and 429 (each with Retry-After), no 5xx, nothing lost, p99 of the
  accepted requests within the bound the queue implies, RSS back to its baseline after a short idle, and
  the server ready and as fast as before.
- **soak**: open-loop arrivals at 70% of capacity for 10 minutes: no errors, RSS growth under 5%,
  latency p50/p99 per one-minute window to show it stays flat. Growth is what a leak or fragmentation would
  show: the median RSS of the last window against that of the first, once the load's own working set (the
  batches' activations, the queue, the connections) is in place; the rise from the idle server before the
  load is reported beside it.

The latency bound: a request accepted into a queue of Q texts served in batches of B waits for the batch
running when it arrives and at most Q/B full batches ahead of it, then runs in its own batch, so it is
answered within (Q/B + 2) x T, with T the service time of
a full batch at full depth (threshold 0: every row runs every layer, the slowest a batch can be), which is
measured on the same server before the load.

Each run writes `loadtest/results/reliability_<mode>.json` and regenerates RELIABILITY.md from every
reliability JSON there, so the overload and soak sections each come from their own latest run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import httpx

from loadtest.bench import DEFAULT_CHECKPOINT, DEFAULT_DATA
from loadtest.generator import CLASSIFY_PATH, THRESHOLD_HEADER, LoadConfig, Workload, run, run_load
from loadtest.records import RequestRecord, metric_total, parse_metrics, percentile
from loadtest.servers import BenchError, deebert_server_command, free_port, server_process
from reports.common import describe_machine, machine_description, markdown_table, percent

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


@dataclass
class ReliabilitySettings:
    """One reliability run; `command_line()` reproduces it."""

    mode: Mode = "overload"
    checkpoint: str = DEFAULT_CHECKPOINT
    data: str = DEFAULT_DATA
    duration: float | None = None
    overload_factor: float = 3.0
    fraction: float = 0.7
    threshold: str | None = None
    capacity_duration: float = 10.0
    capacity_concurrency: int = 32
    max_batch_size: int = 32
    max_queue_size: int = 1024
    service_samples: int = 20
    probe_requests: int = 50
    idle: float = 15.0  # longer than the server's DEEBERT_MEMORY_TRIM_INTERVAL_S (10 s), so freed heap is back
    window: float = 60.0
    rss_interval: float = 0.5
    timeout: float = 60.0
    startup_timeout: float = 180.0
    seed: int = 0
    results_dir: str = "loadtest/results"
    output_md: str = "RELIABILITY.md"
    progress: bool = True

    @property
    def load_duration(self) -> float:
        return self.duration if self.duration is not None else DEFAULT_DURATION[self.mode]

    def command_line(self) -> str:
        """The `deebert reliability` command with every setting that differs from the default."""
        words = ["deebert", "reliability", self.mode]
        defaults = ReliabilitySettings(mode=self.mode)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mode" or value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + f.name.replace("_", "-"))
                continue
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return shlex.join(words)


# --- pure pieces: what the records say, and the checks -------------------------------------------------


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
        "latency_accepted_ms": _latency(latencies),
        # X-Total-Time: from the route taking the request to its answer (tokenize, queue, batch), the span
        # the queue bounds; the client's figure adds its own lag, the network and the server's accept backlog.
        "server_latency_accepted_ms": _latency([r.total_ms for r in accepted if r.total_ms is not None]),
    }


def _latency(ms: Sequence[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99), "max": max(ms)}


def latency_bound_ms(max_queue_size: int, max_batch_size: int, full_batch_ms: float) -> float:
    """The longest an accepted request can take: the batch already running when it is admitted, the Q/B full
    batches queued ahead of it, and its own batch, T each. (Until 2026-11-26 this counted Q/B + 1 batches,
    leaving out the request's own batch.)"""
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


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


def _growth(before: int | None, after: int | None) -> float | None:
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
            f"server-side (X-Total-Time) p99 {_ms(p99)} vs bound {_ms(bound)}",
        )
    )
    lag_ms = 1000 * report["load"]["max_schedule_lag_s"]
    checks.append(
        _check(
            "client p99 within the bound plus the generator's lag",
            client_p99 is not None and bound is not None and client_p99 <= bound + lag_ms,
            f"p99 from the scheduled arrival {_ms(client_p99)} vs {_ms(bound)} + {lag_ms:.0f} ms; a gap to the "
            "server-side p99 is time before the route: the generator's own connection handling or the server's "
            "accept backlog",
        )
    )
    rss = report["rss"]
    if mode == "overload":
        growth = _growth(rss["before"], rss["after"])
        checks.append(
            _check(
                "RSS back to baseline",
                growth is not None and growth <= RSS_TOLERANCE,
                f"before {_fmt_mib(rss['before'])}, peak {_fmt_mib(rss['peak'])}, "
                f"after {report['settings']['idle']:g} s idle {_fmt_mib(rss['after'])} "
                f"({_pct(growth)}; at most +{100 * RSS_TOLERANCE:g}%)",
            )
        )
    else:
        first, last, growth = soak_rss_growth(report["windows"])
        checks.append(
            _check(
                "RSS growth under 5%",
                growth is not None and growth < RSS_TOLERANCE,
                f"median RSS {_mib_text(first)} in the first window, {_mib_text(last)} in the last ({_pct(growth)}); "
                f"idle before the load {_fmt_mib(rss['before'])}, end of load {_fmt_mib(rss['end'])} "
                f"({_pct(_growth(rss['before'], rss['end']))})",
            )
        )
        timed = [w for w in report["windows"] if w["server_p99_ms"] is not None]
        over = [w for w in timed if w["server_p99_ms"] > bound]
        checks.append(
            _check(
                "every window's p99 within the bound",
                bool(timed) and not over,
                f"{len(over)} of {len(timed)} windows over {_ms(bound)}; worst server-side p99 "
                f"{_ms(max((w['server_p99_ms'] for w in timed), default=None))}",
            )
        )
    checks.append(_healthy_after(report))
    before, after = report["before"]["probe"]["p50_ms"], report["after"]["probe"]["p50_ms"]
    fast = before is not None and after is not None and after <= PROBE_SLOWDOWN * before + PROBE_SLACK_MS
    checks.append(
        _check(
            "as fast after as before",
            fast,
            f"probe p50 {_ms(before)} before, {_ms(after)} after (at most {PROBE_SLOWDOWN:g}x + {PROBE_SLACK_MS:g} ms)",
        )
    )
    return checks


def _mib_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def _fmt_mib(value: int | None) -> str:
    """Bytes as MiB text."""
    return _mib_text(_mib(value))


def _pct(value: float | None) -> str:
    return percent(value, signed=True)


# --- measuring a live server ---------------------------------------------------------------------------


def read_rss(pid: int) -> int | None:
    """Resident set size of a process in bytes, from /proc/PID/status (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples a process's RSS every `interval` seconds on the event loop while a coroutine runs."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []

    def sample(self) -> int | None:
        value = read_rss(self.pid)
        if value is not None:
            self.samples.append((time.perf_counter(), value))
        return value

    async def run_until(self, done: asyncio.Event) -> None:
        while not done.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval)
        self.sample()


def probe(url: str, texts: Sequence[str], threshold: str | None, timeout: float) -> dict[str, Any]:
    """One request at a time, one text each: how fast an idle server answers (client-side latency)."""
    headers = {THRESHOLD_HEADER: threshold} if threshold is not None else {}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for text in texts:
            started = time.perf_counter()
            try:
                response = client.post(CLASSIFY_PATH, json={"text": text}, headers=headers)
                status = str(response.status_code)
            except httpx.HTTPError as err:
                status = type(err).__name__
            statuses[status] += 1
            if status == "200":
                latencies.append(1000 * (time.perf_counter() - started))
    summary = _latency(latencies)
    return {
        "requests": len(texts),
        "ok": statuses.get("200", 0),
        "statuses": dict(statuses),
        "p50_ms": summary["p50"],
        "p99_ms": summary["p99"],
    }


def server_runtime(url: str, timeout: float) -> dict[str, str]:
    """The server's device, dtype and memory allocator (`deebert_runtime_info` on /metrics)."""
    samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=timeout).text)
    return next((s.labels for s in samples if s.name == "deebert_runtime_info"), {})


def server_state(url: str, timeout: float) -> dict[str, Any]:
    """/health/ready's status and the queue-depth and in-flight gauges from /metrics."""
    state: dict[str, Any] = {"ready_status": None, "queue_depth": None, "inflight_requests": None}
    with contextlib.suppress(httpx.HTTPError):
        state["ready_status"] = httpx.get(f"{url}/health/ready", timeout=timeout).status_code
    with contextlib.suppress(httpx.HTTPError):
        samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=timeout).text)
        state["queue_depth"] = metric_total(samples, "deebert_queue_depth")
        state["inflight_requests"] = metric_total(samples, "deebert_inflight_requests")
    return state


def measure_full_batch_ms(
    url: str, workload: Workload, batch_size: int, samples: int, timeout: float
) -> dict[str, Any]:
    """Service time of one full batch at full depth: X-Compute-Time of requests of `batch_size` texts at
    threshold 0 (the batch's last row leaves at the last layer, so its compute time is the batch's)."""
    import random

    rng = random.Random(12345)
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for _ in range(samples + 2):  # the first two warm the shapes up and are not counted
            response = client.post(CLASSIFY_PATH, json=workload.body(rng, batch_size), headers={THRESHOLD_HEADER: "0"})
            if response.status_code != 200:
                raise BenchError(f"full-batch probe answered {response.status_code}: {response.text[:300]}")
            times.append(float(response.headers["X-Compute-Time"]))
    counted = times[2:]
    return {
        "batch_size": batch_size,
        "threshold": "0",
        "samples": len(counted),
        "p50_ms": percentile(counted, 50),
        "p90_ms": percentile(counted, 90),
        "max_ms": max(counted),
    }


def measure_capacity(url: str, workload: Workload, settings: ReliabilitySettings) -> dict[str, Any]:
    """Closed loop at `capacity_concurrency` clients, one text per request: the most req/s the server does."""
    report = run(
        LoadConfig(
            url=url,
            concurrency=settings.capacity_concurrency,
            duration=settings.capacity_duration,
            threshold=settings.threshold,
            seed=settings.seed + 1,
            timeout=settings.timeout,
            warmup=20,
            progress=settings.progress,
            label="capacity (closed loop)",
            http_client="raw",
        ),
        workload,
    )
    if report["requests_ok"] == 0:
        raise BenchError(f"the capacity run got no answer: {report['errors']}")
    return {
        "concurrency": settings.capacity_concurrency,
        "duration_s": settings.capacity_duration,
        "throughput_rps": report["throughput_rps"],
        "errors": report["errors"],
        "latency_ms": report["latency_ms"],
    }


async def _load_with_rss(config: LoadConfig, workload: Workload, sampler: RssSampler) -> Any:
    done = asyncio.Event()
    sampling = asyncio.create_task(sampler.run_until(done))
    try:
        return await run_load(config, workload)
    finally:
        done.set()
        await sampling


def run_reliability(settings: ReliabilitySettings) -> dict[str, Any]:
    """Start a server, run the mode, write the JSON and RELIABILITY.md; returns the report."""
    if settings.mode not in MODES:
        raise BenchError(f"unknown mode {settings.mode!r}; choose from {list(MODES)}")
    workload = Workload.from_file(settings.data)
    checkpoint = str(Path(settings.checkpoint).resolve()) if Path(settings.checkpoint).exists() else settings.checkpoint
    server_env = {
        "DEEBERT_MAX_BATCH_SIZE": str(settings.max_batch_size),
        "DEEBERT_MAX_QUEUE_SIZE": str(settings.max_queue_size),
        "DEEBERT_MAX_TEXTS_PER_REQUEST": str(max(64, settings.max_batch_size)),
        "DEEBERT_MAX_WAIT_MS": "0",
        "DEEBERT_LOG_LEVEL": "warning",
    }
    report: dict[str, Any] = {
        "mode": settings.mode,
        "command": settings.command_line(),
        "settings": asdict(settings),
        "machine": machine_description(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server_env": server_env,
    }
    probe_texts = workload.texts[: settings.probe_requests]
    port = free_port()
    say = _say(settings)
    with server_process(deebert_server_command(checkpoint, port), server_env, port, settings.startup_timeout) as (
        process,
        url,
    ):
        report["model"] = httpx.get(f"{url}/v1/model", timeout=10).json()
        report["runtime"] = server_runtime(url, 10)
        say(f"server pid {process.pid} on {url}; probing and timing a full batch")
        report["before"] = {**server_state(url, 10), "probe": probe(url, probe_texts, settings.threshold, 10)}
        service = measure_full_batch_ms(url, workload, settings.max_batch_size, settings.service_samples, 60)
        report["service_time"] = service
        bound = latency_bound_ms(settings.max_queue_size, settings.max_batch_size, service["p50_ms"])
        report["latency_bound"] = {
            "formula": BOUND_FORMULA,
            "max_queue_size": settings.max_queue_size,
            "max_batch_size": settings.max_batch_size,
            "full_batch_ms": service["p50_ms"],
            "bound_ms": bound,
        }
        say("measuring capacity (closed loop)")
        capacity = measure_capacity(url, workload, settings)
        report["capacity"] = capacity
        share = settings.overload_factor if settings.mode == "overload" else settings.fraction
        rate = share * capacity["throughput_rps"]
        time.sleep(min(settings.idle, 2.0))
        sampler = RssSampler(process.pid, settings.rss_interval)
        rss_before = sampler.sample()
        say(f"{settings.mode}: {rate:.1f} req/s ({share:g} x capacity) for {settings.load_duration:g} s")
        config = LoadConfig(
            url=url,
            rate=rate,
            duration=settings.load_duration,
            threshold=settings.threshold,
            seed=settings.seed,
            timeout=settings.timeout,
            progress=settings.progress,
            label=settings.mode,
            # The light client: with httpx the generator, sharing the cores, fell behind its own schedule.
            http_client="raw",
        )
        load_started = time.perf_counter()
        result = asyncio.run(_load_with_rss(config, workload, sampler))
        load_samples = [s for s in sampler.samples if s[0] >= load_started]
        rss_end = load_samples[-1][1] if load_samples else None
        time.sleep(settings.idle)
        rss_after = sampler.sample()
        report["after"] = {**server_state(url, 10), "probe": probe(url, probe_texts, settings.threshold, 10)}
        outcome = classify_records(result.records, result.dropped)
        accepted_rate = outcome["accepted"] / result.duration_s if result.duration_s > 0 else None
        report["load"] = {
            "offered_rps": rate,
            "share_of_capacity": share,
            "duration_s": settings.load_duration,
            "elapsed_s": result.duration_s,
            "arrivals": len(result.records) + result.dropped,
            "max_schedule_lag_s": result.max_schedule_lag_s,
            "accepted_rps": accepted_rate,
        }
        report["outcome"] = outcome
        report["rss"] = {
            "before": rss_before,
            "peak": max((v for _, v in load_samples), default=None),
            "end": rss_end,
            "after": rss_after,
            "samples": [[round(t - load_started, 2), v] for t, v in sampler.samples],
        }
        report["windows"] = windows(result.records, settings.window, load_samples, load_started, settings.load_duration)
    report["checks"] = evaluate_checks(report)
    report["passed"] = all(c["passed"] for c in report["checks"])
    report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results_dir = Path(settings.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"reliability_{settings.mode}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(results_dir, Path(settings.output_md))
    report["files"] = {"json": str(json_path), "markdown": settings.output_md}
    return report


def _say(settings: ReliabilitySettings) -> Any:
    def say(message: str) -> None:
        if settings.progress:
            print(message, file=sys.stderr, flush=True)

    return say


# --- the report: terminal summary and RELIABILITY.md ---------------------------------------------------


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the counts, latency, RSS, and each check."""
    o, load, rss = report["outcome"], report["load"], report["rss"]
    lat, server = o["latency_accepted_ms"], o["server_latency_accepted_ms"]
    lines = [
        f"{report['mode']}: {load['offered_rps']:.1f} req/s offered ({load['share_of_capacity']:g} x capacity "
        f"{report['capacity']['throughput_rps']:.1f} req/s) for {load['duration_s']:g} s",
        f"  sent {o['sent']}  accepted {o['accepted']}  refused {o['refused']}  failed {o['failed']}  "
        f"lost {o['lost']}  client-dropped {o['client_dropped']}",
        f"  accepted latency p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])} (client, from scheduled arrival); "
        f"server-side p50 {_ms(server['p50'])}  p99 {_ms(server['p99'])}",
        f"  queue bound {_ms(report['latency_bound']['bound_ms'])} = {report['latency_bound']['formula']}",
        f"  RSS before {_fmt_mib(rss['before'])}  peak {_fmt_mib(rss['peak'])}  end {_fmt_mib(rss['end'])}  "
        f"after idle {_fmt_mib(rss['after'])}",
    ]
    for check in report["checks"]:
        lines.append(f"  {'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    return "\n".join(lines)


def _checks_lines(report: dict[str, Any]) -> list[str]:
    return [f"- {'✅' if c['passed'] else '❌'} **{c['name']}**: {c['detail']}" for c in report["checks"]]


def _short_note(report: dict[str, Any]) -> list[str]:
    mode: Mode = report["mode"]
    if report["load"]["duration_s"] >= DEFAULT_DURATION[mode]:
        return []
    return [
        f"> **Short run** ({report['load']['duration_s']:g} s instead of {DEFAULT_DURATION[mode]:g} s): a check of "
        "the runner, not the figures the issue asks for.",
        "",
    ]


def _common_lines(report: dict[str, Any]) -> list[str]:
    o, load, bound, service = report["outcome"], report["load"], report["latency_bound"], report["service_time"]
    cap = report["capacity"]
    return [
        f"Command: `{report['command']}` (started {report['started']}, finished {report['finished']}).",
        "",
        f"Machine: {describe_machine(report['machine'])}. The load generator runs on the same machine as the server.",
        "",
        f"Server: `{report['model'].get('model')}` ({report['model'].get('num_layers')} layers"
        + "".join(f", {k} {v}" for k, v in report.get("runtime", {}).items())
        + "), "
        + ", ".join(f"`{k}={v}`" for k, v in report["server_env"].items())
        + f"; requests of one text, threshold `{report['settings']['threshold'] or 'server default'}`.",
        "",
        f"Capacity: {cap['throughput_rps']:.1f} req/s (closed loop, {cap['concurrency']} clients, "
        f"{cap['duration_s']:g} s). Offered: {load['offered_rps']:.1f} req/s open-loop Poisson "
        f"({load['share_of_capacity']:g} x capacity) for {load['duration_s']:g} s; generator lag at most "
        f"{1000 * load['max_schedule_lag_s']:.0f} ms.",
        "",
        f"Latency bound = {bound['formula']} = {bound['bound_ms'] / bound['full_batch_ms']:g} x "
        f"{bound['full_batch_ms']:.1f} ms = **{bound['bound_ms']:.0f} ms**. The full-batch time is the p50 of "
        f"{service['samples']} requests of {service['batch_size']} texts at threshold 0 on the idle server "
        f"(p90 {service['p90_ms']:.1f} ms). Accepted over the whole run, drain included: "
        f"{load['accepted_rps']:.1f} req/s.",
        "",
        *markdown_table(
            ["sent", "accepted (2xx)", "refused (429)", "failed (5xx, other)", "lost", "dropped by the client"],
            [
                [
                    str(o["sent"]),
                    str(o["accepted"]),
                    f"{o['refused']} ({o['refused_without_retry_after']} without Retry-After)",
                    f"{o['failed']} {o['failed_by_status'] or ''}".strip(),
                    f"{o['lost']} {o['lost_by_kind'] or ''}".strip(),
                    str(o["client_dropped"]),
                ]
            ],
        ),
        "",
    ]


def _after_lines(report: dict[str, Any]) -> list[str]:
    before, after = report["before"], report["after"]
    rows = [
        [
            name,
            str(s["ready_status"]),
            f"{s['probe']['ok']}/{s['probe']['requests']}",
            _ms(s["probe"]["p50_ms"]),
            _ms(s["probe"]["p99_ms"]),
            f"{_num(s['queue_depth'])} / {_num(s['inflight_requests'])}",
        ]
        for name, s in (("before", before), ("after", after))
    ]
    return [
        *markdown_table(["", "/health/ready", "probe 200s", "probe p50", "probe p99", "queue depth / in flight"], rows),
        "",
    ]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def overload_section(report: dict[str, Any]) -> list[str]:
    """RELIABILITY.md's overload section, from the run's JSON."""
    lat, rss = report["outcome"]["latency_accepted_ms"], report["rss"]
    server = report["outcome"]["server_latency_accepted_ms"]
    return [
        f"## Overload: {report['load']['share_of_capacity']:g} x capacity for {report['load']['duration_s']:g} s",
        "",
        *_short_note(report),
        *_common_lines(report),
        f"Accepted requests, server-side (X-Total-Time: from the route taking the request to its answer, the "
        f"span the queue bounds): p50 {_ms(server['p50'])}, **p99 {_ms(server['p99'])}**, max {_ms(server['max'])}. "
        f"As the client saw them, from the scheduled arrival (so the generator's own lag, up to "
        f"{1000 * report['load']['max_schedule_lag_s']:.0f} ms here, and the server's accept backlog count): "
        f"p50 {_ms(lat['p50'])}, p90 {_ms(lat['p90'])}, p99 {_ms(lat['p99'])}, max {_ms(lat['max'])}.",
        "",
        f"Server RSS: before {_fmt_mib(rss['before'])}, peak {_fmt_mib(rss['peak'])}, after "
        f"{report['settings']['idle']:g} s idle {_fmt_mib(rss['after'])} "
        f"({_pct(_growth(rss['before'], rss['after']))}).",
        "",
        "Before and after (one request at a time, one text each):",
        "",
        *_after_lines(report),
        *_checks_lines(report),
        "",
    ]


def soak_section(report: dict[str, Any]) -> list[str]:
    """RELIABILITY.md's soak section, from the run's JSON."""
    lat, rss = report["outcome"]["latency_accepted_ms"], report["rss"]
    window_rows = [
        [
            f"{w['start_s']:g}–{w['end_s']:g}",
            str(w["sent"]),
            str(w["errors"]),
            _ms(w["p50_ms"]),
            _ms(w["p99_ms"]),
            _ms(w["server_p99_ms"]),
            "-" if w.get("rss_median_mib") is None else f"{w['rss_median_mib']:.1f}",
            "-" if w["rss_peak_mib"] is None else f"{w['rss_peak_mib']:.1f}",
        ]
        for w in report["windows"]
    ]
    first, last, growth = soak_rss_growth(report["windows"])
    return [
        f"## Soak: {report['load']['share_of_capacity']:g} x capacity for {report['load']['duration_s']:g} s",
        "",
        *_short_note(report),
        *_common_lines(report),
        f"Accepted requests overall, as the client saw them: p50 {_ms(lat['p50'])}, **p99 {_ms(lat['p99'])}**, "
        f"max {_ms(lat['max'])}; server-side p99 {_ms(report['outcome']['server_latency_accepted_ms']['p99'])}. "
        f"Server RSS: median {_mib_text(first)} over the first window, {_mib_text(last)} over the last "
        f"(**{_pct(growth)}**); "
        f"idle before the load {_fmt_mib(rss['before'])}, end of load {_fmt_mib(rss['end'])} "
        f"({_pct(_growth(rss['before'], rss['end']))}: the load's working set and any growth), "
        f"peak {_fmt_mib(rss['peak'])}, after {report['settings']['idle']:g} s idle {_fmt_mib(rss['after'])}.",
        "",
        f"Per {report['settings']['window']:g}-second window (by send time):",
        "",
        *markdown_table(
            ["window (s)", "sent", "errors", "p50", "p99", "server p99", "median RSS (MiB)", "peak RSS (MiB)"],
            window_rows,
        ),
        "",
        "Before and after:",
        "",
        *_after_lines(report),
        *_checks_lines(report),
        "",
    ]


def write_markdown(results_dir: Path, path: Path) -> None:
    """RELIABILITY.md from every `reliability_<mode>.json` in `results_dir` (a mode not run yet says so)."""
    lines = [
        "# Reliability",
        "",
        "Generated by `deebert reliability` from `"
        + str(results_dir)
        + "/reliability_*.json`; do not edit by hand. Each section names its command and machine.",
        "See `loadtest/reliability.py` for what is measured and why each check is what it is.",
        "",
    ]
    for mode in MODES:
        json_path = results_dir / f"reliability_{mode}.json"
        if not json_path.exists():
            lines += [f"## {mode.capitalize()}", "", f"Not run yet: `deebert reliability {mode}`.", ""]
            continue
        report = json.loads(json_path.read_text())
        try:
            lines += overload_section(report) if mode == "overload" else soak_section(report)
        except (KeyError, TypeError) as err:  # a JSON from an older runner
            lines += [
                f"## {mode.capitalize()}",
                "",
                f"`{json_path}` lacks {err}; rerun `deebert reliability {mode}`.",
                "",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


# --- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `deebert reliability`."""
    d = ReliabilitySettings()
    parser.add_argument("mode", choices=MODES, help="overload: 3x capacity for 60 s; soak: 70%% for 600 s")
    parser.add_argument("--checkpoint", default=d.checkpoint, help=f"checkpoint to serve (default {d.checkpoint})")
    parser.add_argument("--data", default=d.data, help=f"texts to send (default {d.data})")
    parser.add_argument("--duration", type=float, help="seconds of load (default: 60 for overload, 600 for soak)")
    parser.add_argument("--overload-factor", type=float, default=d.overload_factor, help="overload: x capacity (3)")
    parser.add_argument("--fraction", type=float, default=d.fraction, help="soak: share of capacity (0.7)")
    parser.add_argument("--threshold", help="X-Exit-Threshold of every request (default: the server's default)")
    parser.add_argument("--capacity-duration", type=float, default=d.capacity_duration, help="closed-loop seconds (10)")
    parser.add_argument("--capacity-concurrency", type=int, default=d.capacity_concurrency, help="closed-loop clients")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="DEEBERT_MAX_BATCH_SIZE (32)")
    parser.add_argument("--max-queue-size", type=int, default=d.max_queue_size, help="DEEBERT_MAX_QUEUE_SIZE (1024)")
    parser.add_argument("--service-samples", type=int, default=d.service_samples, help="full batches timed (20)")
    parser.add_argument("--probe-requests", type=int, default=d.probe_requests, help="probe requests before/after")
    parser.add_argument("--idle", type=float, default=d.idle, help="seconds idle before RSS 'after' (15)")
    parser.add_argument("--window", type=float, default=d.window, help="seconds per latency window (60)")
    parser.add_argument("--rss-interval", type=float, default=d.rss_interval, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=d.timeout, help="per-request timeout, seconds (60)")
    parser.add_argument("--startup-timeout", type=float, default=d.startup_timeout, help="seconds to wait for ready")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--results-dir", default=d.results_dir, help=f"JSON goes here (default {d.results_dir})")
    parser.add_argument("--output-md", default=d.output_md, help=f"markdown to regenerate (default {d.output_md})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")


def settings_from_args(args: argparse.Namespace) -> ReliabilitySettings:
    names = {f.name for f in fields(ReliabilitySettings)}
    return ReliabilitySettings(**{k: v for k, v in vars(args).items() if k in names})


def run_from_args(args: argparse.Namespace) -> int:
    """Run `deebert reliability`: print the summary; exit 1 when a check fails, 2 when the run cannot start."""
    settings = settings_from_args(args)
    if settings.load_duration <= 0 or not math.isfinite(settings.load_duration):
        print("deebert reliability: error: --duration must be > 0", file=sys.stderr)
        return 2
    try:
        report = run_reliability(settings)
    except BenchError as err:
        print(f"deebert reliability: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(report))
    print(f"wrote {report['files']['json']} and {report['files']['markdown']}")
    return 0 if report["passed"] else 1
