"""`benchmarks.cold_tokenizing` and `benchmarks.lone_request_timeline` on a tiny checkpoint: they run and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cold_tokenizing, lone_request_timeline, lone_row_glue
from tests.helpers import LAYERS, sentiment_rows, write_tsv


def test_cold_tokenizing_reports_every_case(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(12))
    output = tmp_path / "cold.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--backend", "torch", "--texts", "12"]
    assert cold_tokenizing.main([*argv, "--skip", "2", "--gaps-ms", "0.1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    cases = {
        "right_after_model_call_us",
        "after_another_tokenize_us",
        "same_text_again_us",
        "after_model_call_and_0.1_ms_idle_us",
    }
    assert set(report["figures"]) == cases | {f"rust_{case}" for case in cases}
    assert all(value > 0 for value in report["figures"].values())


def test_the_timeline_of_a_wrapped_server_lists_every_step_once(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEBERT_BACKEND", "torch")
    monkeypatch.setenv("DEEBERT_LOG_LEVEL", "warning")
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(12))
    output = tmp_path / "timeline.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--seconds", "1", "--skip", "2"]
    assert lone_request_timeline.main([*argv, "--startup-timeout", "120", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["requests"] > 0
    steps = [(step["from"], step["to"]) for step in report["steps"]]
    assert len(steps) == len(lone_request_timeline.STEPS) - 1 and steps[0][0] == "route" and steps[-1][1] == "headers"
    assert {name for pair in steps for name in pair} == set(lone_request_timeline.STEPS)
    assert set(report["writes_us"]) == {"http.response.start", "http.response.body"}


def test_a_lone_rows_time_outside_the_runtime_per_threshold(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both thresholds measured on ONNX Runtime, here and through `--source` (this same tree, in a child)."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DEEBERT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(6))
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--texts", "6", "--rounds", "1",
            "--thresholds", "0,balanced"]  # fmt: skip
    for extra in ([], ["--source", str(Path(__file__).parents[1])]):
        output = tmp_path / f"glue{len(extra)}.json"
        assert lone_row_glue.main([*argv, *extra, "--output", str(output)]) == 0
        report = json.loads(output.read_text())
        assert report["backend"] == "onnxruntime" and set(report["thresholds"]) == {"0", "balanced"}
        full, balanced = report["thresholds"]["0"], report["thresholds"]["balanced"]
        assert full["threshold"] == 0 and full["mean_exit_layer"] == LAYERS
        assert 1 <= balanced["mean_exit_layer"] <= LAYERS and balanced["texts"] == 6
        for row in (full, balanced):
            assert 0 < row["outside_runtime_p50_us"] < row["run_batch_p50_us"]
