"""`deebert bench`: one run on one machine with one data set, which regenerates BENCHMARKS.md.

It starts every server itself as a subprocess on a free loopback port, drives it in-process with the
load generator, stops it with SIGTERM, and writes BENCHMARKS.md, PNG plots and the raw JSON:

1. batch-1 latency (closed loop, one client): full depth vs each preset; measured vs expected saving,
   and the server's own overhead (X-Total-Time minus X-Compute-Time);
2. latency vs throughput under rising open-loop rates, full depth vs balanced, dynamic batching on;
   plus a closed-loop saturation point per configuration;
3. the same curve for the plain endpoints a user would write instead (loadtest/baselines): the plain
   transformers one (`plain`) and the plain ONNX Runtime fp32 one (`plain-ort`, with its batch-1 latency);
4. the balanced curve with compaction off (DEEBERT_COMPACTION=false);
5. one point cross-checked with wrk (or hey) when either is on PATH;
6. the peer runtimes in process (`peers`, loadtest/peers.py): plain PyTorch, ONNX Runtime fp32 and int8,
   OpenVINO, and deebert's loop on torch and ONNX Runtime, each in its own process, interleaved.

Open-loop rates default to fractions of the configuration's own closed-loop saturation, so the curve
lands around the knee on any machine; a curve stops at its first saturated point.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from loadtest.generator import LoadConfig, Workload, run
from model.reporting import machine_description, markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = "weights/sst2-minilm-l6"
DEFAULT_DATA = "../shared/data/sst2/dev.tsv"
PARTS = ("batch1", "curve", "plain", "plain-ort", "compaction", "wrk", "peers")
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
# A point with more errors than this does not count as sustained throughput.
MAX_ERROR_RATE = 0.01
# Saturated: achieved below this share of the offered rate, or p99 this many times the first point's.
SATURATION_SHARE = 0.9
P99_BLOWUP = 10.0

TARGETS = {
    "balanced_vs_full": 1.5,
    "batch1_saving_share": 0.8,
    "full_vs_plain": 2.0,
    "overhead_ms": 1.0,
    "balanced_vs_plain_ort": 1.5,
    "batch1_p50_vs_plain_ort": 1.0,
}


class BenchError(RuntimeError):
    """A server would not start or the bench cannot go on."""


@dataclass
class BenchSettings:
    """Everything one bench run depends on; `command_line()` reproduces it."""

    checkpoint: str = DEFAULT_CHECKPOINT
    data: str = DEFAULT_DATA
    output_md: str = "BENCHMARKS.md"
    results_dir: str = "loadtest/results"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    duration_per_point: float = 8.0
    batch1_duration: float = 8.0
    rates: list[float] | None = None
    rate_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25])
    saturation_concurrency: int = 32
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    threads: int | None = None
    wrk_duration: float = 5.0
    warmup: int = 20
    timeout: float = 30.0
    startup_timeout: float = 180.0
    seed: int = 0
    # The load generator shares the machine's cores with the servers: the raw HTTP/1.1 client costs a
    # fraction of httpx's CPU per request, so more of them go to the server being measured.
    http_client: str = "raw"
    quick: bool = False
    progress: bool = True

    def command_line(self) -> str:
        """The `deebert bench` command with every setting spelled out."""
        words = ["deebert", "bench"]
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "quick" or value is None:
                continue
            if isinstance(value, bool):
                if not value:
                    words.append("--no-" + f.name.replace("_", "-"))
                continue
            if isinstance(value, list):
                value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            elif isinstance(value, float):
                value = f"{value:g}"
            words += [flag, str(value)]
        return shlex.join(words)


QUICK = {
    "duration_per_point": 1.0,
    "batch1_duration": 1.0,
    "rate_fractions": [0.5, 1.0],
    "saturation_concurrency": 8,
    "wrk_duration": 1.0,
    "warmup": 3,
}


# --- servers -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    # Inherited DEEBERT_* settings would silently change what is measured; the bench sets its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEBERT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def deebert_server_command(checkpoint: str, port: int) -> list[str]:
    """argv of `deebert serve` on loopback."""
    return [sys.executable, "-m", "deebert", "serve", "--checkpoint", checkpoint, "--port", str(port)]


def plain_server_command(checkpoint: str, port: int, threads: int | None, backend: str = "torch") -> list[str]:
    """argv of the plain baseline: transformers (`torch`) or the fused fp32 graph on ONNX Runtime."""
    argv = [sys.executable, "-m", "loadtest.baselines.plain_server", "--checkpoint", checkpoint, "--port", str(port)]
    argv += ["--backend", backend]
    return argv + (["--threads", str(threads)] if threads else [])


@contextlib.contextmanager
def server_process(
    argv: list[str], env: dict[str, str], port: int, startup_timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a server subprocess, wait for /health/ready, yield it and its URL; SIGTERM it afterwards."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, env=_server_env(env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, url, startup_timeout, log)
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


@contextlib.contextmanager
def running_server(argv: list[str], env: dict[str, str], port: int, startup_timeout: float) -> Iterator[str]:
    """`server_process` when only the URL is needed."""
    with server_process(argv, env, port, startup_timeout) as (_, url):
        yield url


def _log_tail(log: Any, limit: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return bytes(log.read()).decode(errors="replace")[-limit:]


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{shlex.join(process.args)} exited with {process.returncode}:\n{_log_tail(log)}")  # type: ignore[arg-type]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"server at {url} was not ready after {timeout:g} s:\n{_log_tail(log)}")


def model_info(url: str) -> dict[str, Any]:
    """GET /v1/model of a running server."""
    response = httpx.get(f"{url}/v1/model", timeout=10)
    response.raise_for_status()
    return dict(response.json())


# --- measurements --------------------------------------------------------------------------------------


def _point(
    url: str,
    workload: Workload,
    settings: BenchSettings,
    threshold: str | None,
    label: str,
    *,
    rate: float | None = None,
    concurrency: int = 1,
    duration: float,
) -> dict[str, Any]:
    config = LoadConfig(
        url=url,
        rate=rate,
        concurrency=concurrency,
        duration=duration,
        threshold=threshold,
        seed=settings.seed,
        timeout=settings.timeout,
        warmup=settings.warmup,
        progress=settings.progress,
        label=label,
        http_client="raw" if settings.http_client == "raw" else "httpx",
    )
    report = run(config, workload)
    latency = report["latency_ms"]
    print(
        f"  {label:<34} {report['throughput_rps']:8.1f} req/s  p50 {_num(latency['p50'])} ms  "
        f"p99 {_num(latency['p99'])} ms  errors {sum(report['errors'].values())}",
        file=sys.stderr,
    )
    return report


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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


def measure_curve(
    url: str, workload: Workload, settings: BenchSettings, threshold: str | None, label: str
) -> dict[str, Any]:
    """Closed-loop saturation at high concurrency, then open-loop rates rising until saturation."""
    closed = _point(
        url,
        workload,
        settings,
        threshold,
        f"{label} closed x{settings.saturation_concurrency}",
        concurrency=settings.saturation_concurrency,
        duration=settings.duration_per_point,
    )
    if settings.rates:
        rates = list(settings.rates)
    else:
        base = max(closed["throughput_rps"], 1.0)
        rates = [max(1.0, round(f * base, 1)) for f in settings.rate_fractions]
    points: list[dict[str, Any]] = []
    for rate in rates:
        point = _point(
            url,
            workload,
            settings,
            threshold,
            f"{label} open {rate:g}/s",
            rate=rate,
            duration=settings.duration_per_point,
        )
        points.append(point)
        if is_saturated(point, points[0]):
            break
    closed_ok = closed["error_rate"] <= MAX_ERROR_RATE
    return {
        "label": label,
        "threshold": threshold,
        "rates": rates[: len(points)],
        "closed_loop": closed,
        "points": points,
        "saturated_rps_open": saturated_throughput(points),
        "saturated_rps_closed": closed["throughput_rps"] if closed_ok else None,
    }


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


def measure_batch1(url: str, workload: Workload, settings: BenchSettings, presets: list[str]) -> dict[str, Any]:
    """One client, one text per request: full depth and every preset; measured vs expected saving."""
    runs = {}
    for threshold in ["0", *presets]:
        runs[threshold] = _point(
            url, workload, settings, threshold, f"batch-1 threshold {threshold}", duration=settings.batch1_duration
        )
    full = runs["0"]
    rows = []
    for threshold, report in runs.items():
        timing = report["server_timing"]
        rows.append(
            {
                "threshold": threshold,
                "requests": report["requests_ok"],
                "mean_latency_ms": report["latency_ms"]["mean"],
                "p50_latency_ms": report["latency_ms"]["p50"],
                "mean_compute_ms": timing["compute_ms"]["mean"],
                "overhead_p50_ms": timing["overhead_ms"]["p50"],
                "expected_saving": report["expected_saving"],
                "metrics_expected_saving": report["metrics_expected_saving"],
                "measured_latency_saving": _saving(report["latency_ms"]["mean"], full["latency_ms"]["mean"]),
                "measured_compute_saving": _saving(
                    timing["compute_ms"]["mean"], full["server_timing"]["compute_ms"]["mean"]
                ),
            }
        )
    return {"rows": rows, "runs": runs}


def _saving(value: float | None, full: float | None) -> float | None:
    if value is None or not full:
        return None
    return 1.0 - value / full


# --- external cross-check ------------------------------------------------------------------------------


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and errors from `wrk --latency` output."""
    result: dict[str, Any] = {"throughput_rps": None, "latency_ms": {}, "non_2xx": 0, "socket_errors": None}
    match = re.search(r"Requests/sec:\s*([\d.]+)", output)
    if match:
        result["throughput_rps"] = float(match.group(1))
    for pct, value, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE):
        result["latency_ms"][f"p{pct}"] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    match = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if match:
        result["non_2xx"] = int(match.group(1))
    match = re.search(r"Socket errors:(.*)", output)
    if match:
        result["socket_errors"] = match.group(1).strip()
    return result


def parse_hey(output: str) -> dict[str, Any]:
    """Requests/s and latency percentiles (ms) from `hey` output."""
    result: dict[str, Any] = {"throughput_rps": None, "latency_ms": {}}
    match = re.search(r"Requests/sec:\s*([\d.]+)", output)
    if match:
        result["throughput_rps"] = float(match.group(1))
    for pct, secs in re.findall(r"^\s*(50|90|99)%? in ([\d.]+) secs", output, re.MULTILINE):
        result["latency_ms"][f"p{pct}"] = 1000 * float(secs)
    return result


def external_crosscheck(
    url: str, workload: Workload, settings: BenchSettings, threshold: str, results_dir: Path
) -> dict[str, Any]:
    """Our generator and wrk (or hey), back to back, closed loop at the same concurrency and threshold."""
    tool = next((name for name in ("wrk", "hey") if shutil.which(name)), None)
    if tool is None:
        return {"tool": None, "note": "neither wrk nor hey is on PATH (Debian: apt-get install -y wrk); skipped"}
    concurrency = settings.saturation_concurrency
    seconds = max(1, round(settings.wrk_duration))
    ours = _point(
        url,
        workload,
        settings,
        threshold,
        f"ours closed x{concurrency} (vs {tool})",
        concurrency=concurrency,
        duration=seconds,
    )
    endpoint = f"{url}/v1/classify"
    rng = random.Random(settings.seed)
    with tempfile.TemporaryDirectory() as scratch:
        bodies = Path(scratch) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps(workload.body(rng, 1)) + "\n" for _ in range(500)))
        if tool == "wrk":
            argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(WRK_SCRIPT), endpoint]
            env = {**os.environ, "DEEBERT_WRK_BODIES": str(bodies), "DEEBERT_WRK_THRESHOLD": threshold}
        else:
            first = bodies.read_text().splitlines()[0]
            body_file = Path(scratch) / "body.json"
            body_file.write_text(first)
            argv = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
                    "-H", f"X-Exit-Threshold: {threshold}", "-D", str(body_file), endpoint]  # fmt: skip
            env = dict(os.environ)
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
        except subprocess.TimeoutExpired:
            return {"tool": tool, "note": f"{tool} did not finish in time", "ours": ours}
    parsed = parse_wrk(done.stdout) if tool == "wrk" else parse_hey(done.stdout)
    (results_dir / f"{tool}.txt").write_text(done.stdout + done.stderr)
    ratio = None
    if parsed["throughput_rps"] and ours["throughput_rps"]:
        ratio = ours["throughput_rps"] / parsed["throughput_rps"]
    return {
        "tool": tool,
        # The script's path relative to the checkout, so the report reads the same on any machine.
        "command": shlex.join(argv).replace(str(WRK_SCRIPT), "loadtest/wrk_post.lua"),
        "returncode": done.returncode,
        "concurrency": concurrency,
        "threshold": threshold,
        "duration_s": seconds,
        "external": parsed,
        "ours": ours,
        "ours_over_external": ratio,
    }


# --- targets -------------------------------------------------------------------------------------------


def _target(
    name: str, value: float | None, target: float, higher_is_better: bool, unit: str, why: str
) -> dict[str, Any]:
    if value is None:
        return {"name": name, "target": target, "value": None, "status": "n/a", "detail": why}
    passed = value >= target if higher_is_better else value <= target
    short = (1 - value / target) if higher_is_better else (value / target - 1)
    cmp = ">=" if higher_is_better else "<="
    detail = f"{value:.2f}{unit} (target {cmp} {target:g}{unit})"
    if not passed:
        detail += f"; missed by {100 * short:.0f}%"
    return {"name": name, "target": target, "value": value, "status": "PASS" if passed else "MISS", "detail": detail}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The four targets as PASS/MISS (or n/a when its part was not run), each with its numbers."""
    curves = results.get("curves", {})
    full, balanced, plain = (
        sustained(curves.get("full")),
        sustained(curves.get("balanced")),
        sustained(results.get("plain")),
    )
    batch1 = results.get("batch1")
    rows = {r["threshold"]: r for r in batch1["rows"]} if batch1 else {}
    preset = results.get("balanced_name")
    share = None
    if preset in rows and rows[preset]["expected_saving"] and rows[preset]["measured_latency_saving"] is not None:
        share = rows[preset]["measured_latency_saving"] / rows[preset]["expected_saving"]
    overhead = rows["0"]["overhead_p50_ms"] if "0" in rows else None
    plain_ort = sustained(results.get("plain_ort"))
    plain_ort_p50 = (results.get("plain_ort_batch1") or {}).get("latency_ms", {}).get("p50")
    balanced_p50 = rows[preset]["p50_latency_ms"] if preset in rows else None
    no_preset = "the checkpoint has no presets (run deebert calibrate); " if "model" in results and not preset else ""
    return [
        _target(
            f"saturated throughput at {preset or 'balanced'} vs full depth",
            balanced / full if balanced and full else None,
            TARGETS["balanced_vs_full"],
            True,
            "x",
            no_preset + "needs the curve part",
        ),
        _target(
            f"batch-1 measured latency saving / expected saving ({preset or 'balanced'})",
            share,
            TARGETS["batch1_saving_share"],
            True,
            "",
            no_preset + "needs the batch1 part and a preset with expected saving > 0",
        ),
        _target(
            "saturated throughput, full depth vs plain endpoint",
            full / plain if full and plain else None,
            TARGETS["full_vs_plain"],
            True,
            "x",
            "needs the curve and plain parts",
        ),
        _target(
            "server overhead (X-Total-Time - X-Compute-Time) p50 at batch 1",
            overhead,
            TARGETS["overhead_ms"],
            False,
            " ms",
            "needs the batch1 part",
        ),
        _target(
            f"saturated throughput at {preset or 'balanced'} vs the plain ONNX Runtime endpoint",
            balanced / plain_ort if balanced and plain_ort else None,
            TARGETS["balanced_vs_plain_ort"],
            True,
            "x",
            no_preset + "needs the curve and plain-ort parts",
        ),
        _target(
            f"batch-1 p50 latency at {preset or 'balanced'} / the plain ONNX Runtime endpoint's",
            balanced_p50 / plain_ort_p50 if balanced_p50 and plain_ort_p50 else None,
            TARGETS["batch1_p50_vs_plain_ort"],
            False,
            "x",
            no_preset + "needs the batch1 and plain-ort parts",
        ),
    ]


def _analysis(results: dict[str, Any]) -> list[str]:
    """Where the time goes, from this run's own numbers: what a missed target is made of."""
    lines: list[str] = []
    batch1 = results.get("batch1")
    rows = {r["threshold"]: r for r in batch1["rows"]} if batch1 else {}
    preset = results.get("balanced_name")
    if "0" in rows and preset in rows:
        full, fast = rows["0"], rows[preset]
        outside = full["mean_latency_ms"] - full["mean_compute_ms"]
        lines.append(
            f"Batch 1: at full depth a request takes {full['mean_latency_ms']:.2f} ms at the client, of which "
            f"{full['mean_compute_ms']:.2f} ms is the model (X-Compute-Time); the other {outside:.2f} ms (HTTP on "
            "loopback, the Python client, tokenizing, queueing) is paid whatever the exit layer, so the latency "
            f"saving at {preset} ({_pct(fast['measured_latency_saving'])}) trails the model-time saving "
            f"({_pct(fast['measured_compute_saving'])}) and the expected saving ({_pct(fast['expected_saving'])})."
        )
    cross = results.get("wrk") or results.get("external")
    if isinstance(cross, dict) and cross.get("ours_over_external"):
        lines.append(
            f"Throughput: the load generator runs on the same two cores as the server; on the same server wrk "
            f"(a C client) sustained {1 / cross['ours_over_external']:.2f}x what the Python generator did, so "
            "every saturated figure here is partly the client's limit, the plain endpoint's included."
        )
    return [*(f"{line}\n" for line in lines)]


# --- machine -------------------------------------------------------------------------------------------


def compaction_supported() -> bool:
    """Whether this checkout's ServerSettings reads DEEBERT_COMPACTION (otherwise the env var is ignored)."""
    try:
        from server.settings import ServerSettings
    except ImportError:
        return False
    return "compaction" in ServerSettings.model_fields


# --- the run -------------------------------------------------------------------------------------------


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every selected part, then write the JSON, the plots and the markdown; returns the results."""
    unknown = sorted(set(settings.parts) - set(PARTS))
    if unknown:
        raise BenchError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    started = time.time()
    results_dir = Path(settings.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = str(Path(settings.checkpoint).resolve()) if Path(settings.checkpoint).exists() else settings.checkpoint
    workload = Workload.from_file(settings.data)
    results: dict[str, Any] = {
        "command": settings.command_line(),
        "settings": asdict(settings),
        "machine": machine_description(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "curves": {},
    }
    server_env = {
        "DEEBERT_MAX_BATCH_SIZE": str(settings.max_batch_size),
        "DEEBERT_MAX_WAIT_MS": f"{settings.max_wait_ms:g}",
        "DEEBERT_LOG_LEVEL": "warning",
        **({"DEEBERT_THREADS": str(settings.threads)} if settings.threads else {}),
    }
    results["server_env"] = server_env
    parts = set(settings.parts)

    if parts & {"batch1", "curve", "wrk"}:
        port = free_port()
        print(f"deebert server (batch {settings.max_batch_size}) on port {port}", file=sys.stderr)
        with running_server(
            deebert_server_command(checkpoint, port), server_env, port, settings.startup_timeout
        ) as url:
            info = model_info(url)
            results["model"] = info
            presets = [p["name"] for p in info.get("presets", [])]
            balanced = "balanced" if "balanced" in presets else (presets[len(presets) // 2] if presets else None)
            results["balanced_name"] = balanced
            if "batch1" in parts:
                results["batch1"] = measure_batch1(url, workload, settings, presets)
            if "curve" in parts:
                results["curves"]["full"] = measure_curve(url, workload, settings, "0", "full depth")
                if balanced is not None:
                    results["curves"]["balanced"] = measure_curve(url, workload, settings, balanced, balanced)
            if "wrk" in parts:
                results["wrk"] = external_crosscheck(url, workload, settings, "0", results_dir)

    if "compaction" in parts:
        results["compaction_supported"] = compaction_supported()
        port = free_port()
        print(f"deebert server, compaction off, on port {port}", file=sys.stderr)
        env = {**server_env, "DEEBERT_COMPACTION": "false"}
        with running_server(deebert_server_command(checkpoint, port), env, port, settings.startup_timeout) as url:
            name = results.get("balanced_name") or _balanced_of(model_info(url))
            results["balanced_name"] = name
            if name is not None:
                results["no_compaction"] = measure_curve(url, workload, settings, name, f"{name}, no compaction")

    if "plain" in parts:
        port = free_port()
        print(f"plain baseline server on port {port}", file=sys.stderr)
        argv = plain_server_command(checkpoint, port, settings.threads)
        with running_server(argv, {}, port, settings.startup_timeout) as url:
            results["plain"] = measure_curve(url, workload, settings, None, "plain endpoint")

    if "plain-ort" in parts:
        port = free_port()
        print(f"plain ONNX Runtime baseline server on port {port}", file=sys.stderr)
        argv = plain_server_command(checkpoint, port, settings.threads, backend="onnxruntime")
        with running_server(argv, {}, port, settings.startup_timeout) as url:
            results["plain_ort_batch1"] = _point(
                url, workload, settings, None, "plain ORT batch-1", duration=settings.batch1_duration
            )
            results["plain_ort"] = measure_curve(url, workload, settings, None, "plain ONNX Runtime endpoint")

    if "peers" in parts:
        from loadtest.peers import PeerSettings, run_peers

        # The workers run in this directory, as the data path is given; the checkpoint as given when it is here.
        peer_checkpoint = settings.checkpoint if Path(settings.checkpoint).exists() else checkpoint
        peer_settings = PeerSettings(checkpoint=peer_checkpoint, data=settings.data, threads=settings.threads or 2)
        if settings.quick:
            peer_settings.batch1_rows, peer_settings.rounds = 10, 1
            peer_settings.variants = ("torch-plain", "ort-plain", "ort-balanced")
        results["peers"] = run_peers(peer_settings, log_path=results_dir / "peers.log")

    results["targets"] = evaluate_targets(results)
    results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["elapsed_s"] = time.time() - started
    results["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    json_path = results_dir / "bench.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    results["files"] = {"json": str(json_path), **write_plots(results, results_dir)}
    write_markdown(results, Path(settings.output_md))
    return results


def _balanced_of(info: dict[str, Any]) -> str | None:
    presets = [p["name"] for p in info.get("presets", [])]
    return "balanced" if "balanced" in presets else (presets[len(presets) // 2] if presets else None)


# --- plots and markdown --------------------------------------------------------------------------------


def _all_curves(results: dict[str, Any]) -> list[dict[str, Any]]:
    curves = list(results.get("curves", {}).values())
    curves += [results[key] for key in ("no_compaction", "plain") if results.get(key)]
    return curves


def write_plots(results: dict[str, Any], directory: Path) -> dict[str, str]:
    """latency_throughput.png and batch1_saving.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    curves = _all_curves(results)
    if curves:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        for curve in curves:
            xs = [p["throughput_rps"] for p in curve["points"]]
            for axis, key in zip(axes, ("p50", "p99"), strict=True):
                ys = [p["latency_ms"][key] for p in curve["points"]]
                line = axis.plot(xs, ys, marker="o", label=curve["label"])[0]
                closed = curve["closed_loop"]
                if closed["latency_ms"][key] is not None:
                    axis.plot(closed["throughput_rps"], closed["latency_ms"][key], marker="x", color=line.get_color())
        for axis, key in zip(axes, ("p50", "p99"), strict=True):
            axis.set_yscale("log")
            axis.set_xlabel("achieved throughput (requests/s)")
            axis.set_ylabel(f"{key} latency (ms)")
            axis.set_title(f"{key} latency vs throughput (o open loop, x closed loop)")
            axis.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        figure.tight_layout()
        path = directory / "latency_throughput.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written["latency_throughput"] = str(path)
    batch1 = results.get("batch1")
    rows = [r for r in batch1["rows"] if r["threshold"] != "0"] if batch1 else []
    if rows:
        figure, axis = plt.subplots(figsize=(7, 4))
        positions = list(range(len(rows)))
        width = 0.27
        series = (
            ("expected (exit layers)", "expected_saving"),
            ("measured (client latency)", "measured_latency_saving"),
            ("measured (server compute)", "measured_compute_saving"),
        )
        for offset, (name, key) in zip((-width, 0.0, width), series, strict=True):
            axis.bar([x + offset for x in positions], [100 * (r[key] or 0.0) for r in rows], width, label=name)
        axis.set_xticks(positions, [r["threshold"] for r in rows])
        axis.set_ylabel("saving vs full depth (%)")
        axis.set_title("batch 1: measured vs expected saving")
        axis.legend(fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
        figure.tight_layout()
        path = directory / "batch1_saving.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written["batch1_saving"] = str(path)
    return written


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(markdown_table(header, rows))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _errors(report: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "0"


def _curve_section(curve: dict[str, Any]) -> str:
    rows = []
    for point in [curve["closed_loop"], *curve["points"]]:
        latency = point["latency_ms"]
        load = f"open {point['rate']:g}/s" if point["mode"] == "open" else f"closed x{point['concurrency']}"
        rows.append(
            [
                load,
                _num(point["throughput_rps"], 1),
                _num(point["texts_per_s"], 1),
                _num(latency["p50"]),
                _num(latency["p90"]),
                _num(latency["p99"]),
                _errors(point),
                _pct(point["expected_saving"]),
            ]
        )
    header = ["load", "req/s", "texts/s", "p50 ms", "p90 ms", "p99 ms", "errors", "expected saving"]
    sat = (
        f"Saturated throughput: **{_num(sustained(curve), 1)} req/s** (best of: "
        f"{_num(curve['saturated_rps_open'], 1)} req/s open loop, "
        f"{_num(curve['saturated_rps_closed'], 1)} req/s closed loop)."
    )
    return f"#### {curve['label']}\n\n{_md_table(header, rows)}\n\n{sat}\n"


def _relative(path: str, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve().parent)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """BENCHMARKS.md: machine, command, targets, one section per part, plots."""
    m = results["machine"]
    s = results["settings"]
    model = results.get("model", {})
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = m["load_average"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `deebert bench` on {results['started']} in {results['elapsed_s']:.0f} s. Every number below "
        "comes from this one run: same machine, same data, servers started by the bench on loopback, the load "
        f"generator (`deebert loadtest`, in-process, its {s['http_client']} HTTP client) as the only client. "
        "Regenerate with:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Machine",
        "",
        f"- {m['platform']} ({m['machine']}), CPU: {m['cpu'] or 'unknown'}, {m['cpu_count']} logical CPUs "
        f"({m['cpus_usable']} usable), {m['memory_gib']} GiB memory",
        f"- SIMD: {' '.join(m.get('cpu_flags') or []) or 'not reported'} (the instruction sets that decide which "
        "kernels, runtime and precision are fastest here)",
        f"- Python {m['python']}; {versions}",
        f"- model: {model.get('model', '-')} ({model.get('num_layers', '-')} layers) on {model.get('device', '-')}, "
        f"{model.get('dtype', '-')}; data: `{s['data']}`",
        f"- server: {', '.join(f'{k}={v}' for k, v in results['server_env'].items())}",
        f"- load average at start {', '.join(f'{x:.2f}' for x in load) if load else '-'}; client and servers share "
        "these CPUs, so the generator's own cost is part of every number",
        "",
        "## Targets",
        "",
        _md_table(["target", "result", "numbers"], [[t["name"], t["status"], t["detail"]] for t in results["targets"]]),
        "",
        *_analysis(results),
    ]
    batch1 = results.get("batch1")
    if batch1:
        rows = [
            [
                r["threshold"],
                str(r["requests"]),
                _num(r["mean_latency_ms"]),
                _num(r["p50_latency_ms"]),
                _num(r["mean_compute_ms"]),
                _num(r["overhead_p50_ms"], 3),
                _pct(r["expected_saving"]),
                _pct(r["metrics_expected_saving"]),
                _pct(r["measured_latency_saving"]),
                _pct(r["measured_compute_saving"]),
            ]
            for r in batch1["rows"]
        ]
        header = ["threshold", "requests", "mean ms", "p50 ms", "compute ms", "overhead p50 ms", "expected saving",
                  "/metrics saving", "measured (latency)", "measured (compute)"]  # fmt: skip
        out += [
            "## 1. Batch-1 latency",
            "",
            f"Closed loop, one client, one text per request, {s['batch1_duration']:g} s per threshold. Measured saving "
            "= 1 - mean latency / mean latency at threshold 0 (client-side; the compute column uses X-Compute-Time). "
            "Expected saving = 1 - Σ i·N_i / (n·Σ N_i) from the responses' exit layers; the /metrics column is the "
            "same from the server's counters. Overhead = X-Total-Time - X-Compute-Time (tokenizing, queueing, "
            "scheduling), per request.",
            "",
            _md_table(header, rows),
            "",
        ]
    curves = results.get("curves", {})
    if curves:
        out += [
            "## 2. Latency vs throughput",
            "",
            f"Dynamic batching (max batch {s['max_batch_size']}, max wait {s['max_wait_ms']:g} ms). One closed-loop "
            f"point at {s['saturation_concurrency']} clients, then open-loop Poisson arrivals at rising rates "
            f"({s['duration_per_point']:g} s each) until saturation (achieved < {SATURATION_SHARE:.0%} of offered, "
            f"errors > {MAX_ERROR_RATE:.0%}, or p99 > {P99_BLOWUP:g}x the first point's). Saturated throughput = "
            "the most requests/s a point sustained with few errors. Open-loop latency counts from the scheduled "
            "arrival.",
            "",
        ]
        out += [_curve_section(c) for c in curves.values()]
    if results.get("plain"):
        out += [
            "## 3. Baseline: a plain transformers endpoint",
            "",
            "`loadtest/baselines/plain_server.py`: the same weights as a plain full forward (encoder + final "
            "classifier), one request at a time, no batching, no early exit.",
            "",
            _curve_section(results["plain"]),
        ]
    if results.get("plain_ort"):
        point = results.get("plain_ort_batch1") or {}
        latency = point.get("latency_ms", {})
        out += [
            "## 3b. Baseline: a plain ONNX Runtime endpoint",
            "",
            "`loadtest/baselines/plain_server.py --backend onnxruntime`: the same weights as the BERT-fused fp32 "
            "ONNX graph (the plain graph deebert's ONNX Runtime backend runs at full depth), one request at a time, "
            "no batching, no early exit: what a user who exports to ONNX Runtime serves.",
            "",
            f"Batch 1 (one client, {s['batch1_duration']:g} s): p50 {_num(latency.get('p50'))} ms, mean "
            f"{_num(latency.get('mean'))} ms, p99 {_num(latency.get('p99'))} ms.",
            "",
            _curve_section(results["plain_ort"]),
        ]
    if "compaction_supported" in results:
        note = (
            "The server reads `DEEBERT_COMPACTION`."
            if results["compaction_supported"]
            else "**This checkout's server has no `compaction` setting yet: DEEBERT_COMPACTION was ignored, so this "
            "curve measures compaction on.**"
        )
        out += [
            "## 4. Compaction vs none",
            "",
            f"The balanced curve again on a server started with `DEEBERT_COMPACTION=false` (exited rows stay in the "
            f"batch, masked, until every row has left). {note}",
            "",
        ]
        if results.get("no_compaction"):
            with_c, without = sustained(curves.get("balanced")), sustained(results["no_compaction"])
            ratio = f"{with_c / without:.2f}x" if with_c and without else "-"
            out += [_curve_section(results["no_compaction"]), f"Compaction on / off, saturated: {ratio}.", ""]
    wrk = results.get("wrk")
    if wrk is not None:
        out += ["## 5. Cross-check with an external tool", ""]
        if wrk.get("tool") is None or "external" not in wrk:
            out += [wrk.get("note", "not run"), ""]
        else:
            ext, ours = wrk["external"], wrk["ours"]
            rows = [
                [wrk["tool"], _num(ext["throughput_rps"], 1), _num(ext["latency_ms"].get("p50")),
                 _num(ext["latency_ms"].get("p99")), str(ext.get("non_2xx", "-"))],
                ["deebert loadtest", _num(ours["throughput_rps"], 1), _num(ours["latency_ms"]["p50"]),
                 _num(ours["latency_ms"]["p99"]), str(sum(ours["errors"].values()))],
            ]  # fmt: skip
            out += [
                f"Closed loop, {wrk['concurrency']} connections, threshold {wrk['threshold']}, {wrk['duration_s']} s "
                f"each, back to back on the same server. `{wrk['command']}`",
                "",
                _md_table(["tool", "req/s", "p50 ms", "p99 ms", "errors"], rows),
                "",
                f"Ours / {wrk['tool']}: {_num(wrk['ours_over_external'])}.",
                "",
            ]
    if results.get("peers"):
        from loadtest.peers import markdown_section

        out += markdown_section(results["peers"], "## 6. Peer runtimes, in process")
    files = results.get("files", {})
    plots = [(name, p) for name, p in files.items() if p.endswith(".png")]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{name}]({_relative(p, path)})" for name, p in plots]
        out += [""]
    out += [f"Raw numbers: `{_relative(files['json'], path)}`." if "json" in files else "", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


# --- command line --------------------------------------------------------------------------------------


def _floats(value: str) -> list[float]:
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from err
    if not numbers or any(not math.isfinite(n) or n <= 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {value!r}")
    return numbers


def _parts(value: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"parts are a comma-separated subset of {','.join(PARTS)}; got {value!r}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `deebert bench`; unset ones take --quick's value, else the default."""
    d = BenchSettings()
    parser.add_argument("--checkpoint", default=d.checkpoint, help=f"DeeBERT checkpoint (default {d.checkpoint})")
    parser.add_argument("--data", default=d.data, help=f"texts to send (default {d.data})")
    parser.add_argument("--output-md", default=d.output_md, help=f"markdown to write (default {d.output_md})")
    parser.add_argument("--results-dir", default=d.results_dir, help=f"JSON and PNGs (default {d.results_dir})")
    parser.add_argument("--parts", type=_parts, help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="seconds instead of minutes: 1 s points, 2 rates, x8")
    parser.add_argument("--duration-per-point", type=float, help=f"seconds per curve point ({d.duration_per_point:g})")
    parser.add_argument("--batch1-duration", type=float, help=f"seconds per batch-1 threshold ({d.batch1_duration:g})")
    parser.add_argument("--rates", type=_floats, help="open-loop rates, req/s (default: fractions of saturation)")
    parser.add_argument(
        "--rate-fractions",
        type=_floats,
        help="open-loop rates as fractions of the closed-loop saturation "
        f"({','.join(f'{f:g}' for f in d.rate_fractions)})",
    )
    parser.add_argument("--saturation-concurrency", type=int, help=f"closed-loop clients ({d.saturation_concurrency})")
    parser.add_argument("--max-batch-size", type=int, help=f"DEEBERT_MAX_BATCH_SIZE ({d.max_batch_size})")
    parser.add_argument("--max-wait-ms", type=float, help=f"DEEBERT_MAX_WAIT_MS ({d.max_wait_ms:g})")
    parser.add_argument("--threads", type=int, help="DEEBERT_THREADS for the servers (default: torch's choice)")
    parser.add_argument("--wrk-duration", type=float, help=f"seconds of the wrk/hey cross-check ({d.wrk_duration:g})")
    parser.add_argument("--warmup", type=int, help=f"unmeasured requests before each point ({d.warmup})")
    parser.add_argument("--timeout", type=float, help=f"per-request timeout, seconds ({d.timeout:g})")
    parser.add_argument("--startup-timeout", type=float, help=f"seconds to wait for a server ({d.startup_timeout:g})")
    parser.add_argument("--seed", type=int, help=f"seed ({d.seed})")
    parser.add_argument(
        "--http-client", choices=["raw", "httpx"], help=f"the load generator's HTTP client ({d.http_client})"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Explicit flags win, then --quick's values, then the defaults."""
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for f in fields(BenchSettings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return BenchSettings(**values)


def run_from_args(args: argparse.Namespace) -> int:
    """Run `deebert bench`; exit 2 when a server cannot start."""
    settings = settings_from_args(args)
    try:
        results = run_bench(settings)
    except BenchError as err:
        print(f"deebert bench: error: {err}", file=sys.stderr)
        return 2
    for target in results["targets"]:
        print(f"{target['status']:<5} {target['name']}: {target['detail']}")
    print(f"wrote {settings.output_md}, {results['files'].get('json')} and plots in {settings.results_dir}")
    return 0
