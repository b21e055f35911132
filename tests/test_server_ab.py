"""benchmarks.server_ab: its configurations and the pairwise summary (no servers, no wrk)."""

from __future__ import annotations

import pytest

from benchmarks.server_ab import Configuration, format_summary, summarize


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
