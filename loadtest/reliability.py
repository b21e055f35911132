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

Split by job: this module measures a live server (settings, capacity, probes, RSS, the run, the command
line); `loadtest.reliability_checks` says what the records mean and which checks pass (pure functions);
`loadtest.reliability_report` writes the terminal summary and RELIABILITY.md; `loadtest.servers` starts
and stops the server.
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
from typing import Any

import httpx
import numpy as np
import psutil

from loadtest.bench import DEFAULT_CHECKPOINT, DEFAULT_DATA
from loadtest.generator import LoadConfig, Workload, run, run_load
from loadtest.records import metric_total, parse_metrics
from loadtest.reliability_checks import (
    BOUND_FORMULA,
    DEFAULT_DURATION,
    MODES,
    Mode,
    classify_records,
    evaluate_checks,
    latency_bound_ms,
    latency_summary,
    windows,
)
from loadtest.reliability_report import format_summary, write_markdown
from loadtest.servers import BenchError, deebert_server_command, free_port, server_process
from reports.common import machine_description
from server.protocol import CLASSIFY_PATH, COMPUTE_TIME_HEADER, THRESHOLD_HEADER


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


# --- measuring a live server ---------------------------------------------------------------------------


def read_rss(pid: int) -> int | None:
    """Resident set size of a process in bytes (psutil); None once the process is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
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
    summary = latency_summary(latencies)
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
            times.append(float(response.headers[COMPUTE_TIME_HEADER]))
    counted = times[2:]
    return {
        "batch_size": batch_size,
        "threshold": "0",
        "samples": len(counted),
        "p50_ms": float(np.percentile(counted, 50)),
        "p90_ms": float(np.percentile(counted, 90)),
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
