"""benchmarks.server_ab: its configurations and the pairwise summary (no servers, no wrk)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from benchmarks.server_ab import (
    Configuration,
    format_summary,
    main,
    measure_overhead,
    summarize,
    summarize_overhead,
)


def test_a_configuration_is_a_name_and_deebert_settings() -> None:
    assert Configuration.parse("default:") == Configuration("default", {})
    assert Configuration.parse("ort:DEEBERT_BACKEND=onnxruntime,DEEBERT_THREADS=1") == Configuration(
        "ort", {"DEEBERT_BACKEND": "onnxruntime", "DEEBERT_THREADS": "1"}
    )
    with pytest.raises(ValueError, match="name"):
        Configuration.parse(":DEEBERT_THREADS=1")
    with pytest.raises(ValueError, match="DEEBERT_KEY=VALUE"):
        Configuration.parse("x:THREADS=1")
    with pytest.raises(ValueError, match="DEEBERT_KEY=VALUE"):
        Configuration.parse("x:DEEBERT_THREADS")


def _run(pair: int, name: str, connections: int, rps: float) -> dict[str, object]:
    return {"pair": pair, "configuration": name, "connections": connections, "throughput_rps": rps,
            "latency_ms": {"p50": 1000 * connections / rps}}  # fmt: skip


def test_the_summary_compares_the_two_within_each_pair() -> None:
    configurations = [Configuration("a", {}), Configuration("b", {"DEEBERT_THREADS": "1"})]
    runs = [
        _run(1, "a", 32, 400.0), _run(1, "b", 32, 500.0),
        _run(2, "b", 32, 300.0), _run(2, "a", 32, 200.0),
        _run(3, "a", 32, 400.0), _run(3, "b", 32, 360.0),
        _run(1, "a", 1, 250.0), _run(1, "b", 1, 250.0),
    ]  # fmt: skip
    rows = {row["connections"]: row for row in summarize(runs, configurations)}
    assert rows[32]["b_over_a"] == pytest.approx([1.25, 1.5, 0.9])
    assert rows[32]["median_b_over_a"] == pytest.approx(1.25)
    assert rows[32]["pairs_b_faster"] == 2
    assert rows[32]["a"]["rps"] == [400.0, 200.0, 400.0] and rows[32]["b"]["median_rps"] == 360.0
    assert rows[1]["b_over_a"] == [1.0] and rows[1]["pairs_b_faster"] == 0
    machine = {"cpu": "test CPU", "cpu_count": 2, "versions": {}}
    table = format_summary({"command": "cmd", "machine": machine, "configurations": [
        {"name": "a"}, {"name": "b"}], "summary": summarize(runs, configurations)})  # fmt: skip
    assert "| 32 | 400, 200, 400 | 500, 300, 360 | 1.25, 1.50, 0.90 | 1.25 |" in table
    assert "stolen" not in table, "runs recorded without steal say nothing of it"
    for run, stolen in zip(runs, [0.01, 0.02, 0.05, 0.0, 0.01, 0.03, None, None], strict=True):
        run["cpu_stolen"] = stolen
    table = format_summary({"command": "cmd", "machine": machine, "configurations": [
        {"name": "a"}, {"name": "b"}], "runs": runs, "summary": summarize(runs, configurations)})  # fmt: skip
    assert "stolen by the hypervisor while measuring: a median 1.0%, highest 1.0%; b median 3.0%, highest 5.0%" in table


class _TimedHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with fixed timing headers: total 1.5, compute 1.0, tokenizing 0.2, queue 0.1 (ms)."""

    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[bytes]] = []
    thresholds: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.thresholds.append(self.headers.get("X-Exit-Threshold"))
        self.send_response(200)
        for name, value in (("X-Total-Time", "1.500"), ("X-Compute-Time", "1.000"), ("X-Tokenization-Time", "0.200"),
                            ("X-Queue-Time", "0.100"), ("Content-Length", "2")):  # fmt: skip
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def timed_server() -> Iterator[str]:
    _TimedHandler.bodies, _TimedHandler.thresholds = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TimedHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("client", "pause_s"), [("socket", 0.0), ("generator", 0.0), ("socket", 0.01), ("generator", 0.01)]
)
def test_the_overhead_is_read_from_the_timing_headers_after_untimed_requests(
    timed_server: str, client: str, pause_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []  # the client's pauses, counted (and not waited for)
    real_sleep, real_async_sleep = time.sleep, asyncio.sleep

    async def async_pause(seconds: float) -> None:
        pauses.append(seconds)
        await real_async_sleep(0)

    monkeypatch.setattr(time, "sleep", lambda seconds: pauses.append(seconds) or real_sleep(0))
    monkeypatch.setattr(asyncio, "sleep", async_pause)
    measured = measure_overhead(timed_server, [b'{"text": "a"}', b'{"text": "b"}'], 8, "fast", client, pause_s)
    assert pauses == ([pause_s] * 10 if pause_s else []), "a pause after each answer, untimed ones too"
    assert measured["pause_ms"] == pytest.approx(1000 * pause_s)
    assert len(_TimedHandler.bodies) == 8 + 2, "a quarter as many untimed requests first"
    assert [json.loads(body) for body in _TimedHandler.bodies[:3]] == [{"text": "a"}, {"text": "b"}, {"text": "a"}]
    assert _TimedHandler.thresholds == ["fast"] * 10 and measured["client"] == client
    assert measured["overhead_p50_ms"] == pytest.approx(0.5) and measured["rest_p50_ms"] == pytest.approx(0.2)
    assert measured["overhead_per_compute"] == pytest.approx(0.5) and measured["rest_per_compute"] == pytest.approx(0.2)
    assert measured["round_trip_p50_ms"] > 0 and measured["requests"] == 8


def test_the_overhead_summary_compares_within_each_pair() -> None:
    configurations = [Configuration("before", {}), Configuration("after", {})]
    fields = {"tokenization_p50_ms": 0.1, "queue_p50_ms": 0.05, "compute_p50_ms": 1.0, "round_trip_p50_ms": 2.0}

    def run(pair: int, name: str, overhead: float) -> dict[str, object]:
        rest = overhead - 0.15
        return {"pair": pair, "configuration": name, "overhead_p50_ms": overhead, "rest_p50_ms": rest,
                "overhead_per_compute": overhead, "rest_per_compute": rest, **fields}  # fmt: skip

    runs = [run(1, "before", 0.4), run(1, "after", 0.3), run(2, "after", 0.35), run(2, "before", 0.35)]
    runs.append(run(3, "before", 0.5))  # a pair without its other half is left out
    summary = summarize_overhead(runs, configurations)
    assert summary["pairs"] == [1, 2]
    assert summary["before"]["overhead_p50_ms"] == {"values": [0.4, 0.35], "median": pytest.approx(0.375)}
    assert summary["b_over_a"]["overhead_p50_ms"] == pytest.approx([0.75, 1.0])
    machine = {"cpu": "test CPU", "cpu_count": 2, "versions": {}}
    report = {"command": "cmd", "machine": machine, "configurations": [{"name": "before"}, {"name": "after"}],
              "summary": [], "overhead": summary, "overhead_requests": 100}  # fmt: skip
    assert "| overhead_p50_ms | 0.400, 0.350 | 0.300, 0.350 | 0.75, 1.00 | 0.88 |" in format_summary(report)


def test_a_source_tree_must_be_a_deebert_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--a", "a:", "--b", "b:", "--b-source", str(tmp_path), "--overhead-requests", "10"]) == 2
    assert "not a deebert source tree" in capsys.readouterr().err
    assert main(["--a", "a:", "--b", "b:", "--connections", "0"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
