"""benchmarks.first_start_tune: each run tunes in a scratch cache that reuses the graphs and keeps no tune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import first_start_tune
from model import tune


def test_a_run_tunes_in_a_scratch_cache_linked_to_the_graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = tmp_path / "cache"
    (graphs / "onnx").mkdir(parents=True)
    (graphs / "onnx" / "exported.onnx").write_text("graph")
    seen: dict[str, Any] = {}

    def fake_run_tune(directory: Path, cache: Path, threads: int | None, objective: str, timing: tune.Timing,
                      budget_s: float | None = None) -> tune.TuneResult:  # fmt: skip
        seen.update(cache=cache, objective=objective, timing=timing, budget_s=budget_s)
        assert (cache / "onnx" / "exported.onnx").read_text() == "graph"  # the real cache's graphs, reused
        (cache / "tune").mkdir()
        (cache / "tune" / "choice.json").write_text("{}")  # a tune written here stays out of the real cache
        fast = tune.Measurement("onnxruntime-fp32", 1.4, 800.0, eligible=True, batch1_retimed=True)
        batches = tune.Measurement("openvino-bf16", 1.6, 2000.0, eligible=True, batch1_retimed=True,
                                   batched_retimed=True)  # fmt: skip
        slow = tune.Measurement("torch-bf16", 3.0, 1400.0, eligible=True, batched_retimed=True, seconds=9.5)
        return tune.TuneResult(
            fingerprint={}, objective=objective, choice="onnxruntime-fp32", batched_choice="openvino-bf16",
            measurements=[fast, batches, slow], seconds=30.0,
        )  # fmt: skip

    monkeypatch.setattr(tune, "run_tune", fake_run_tune)
    run = first_start_tune.one_run(tmp_path / "checkpoint", graphs, 2, 16, 60.0)
    assert seen["objective"] == "split" and seen["budget_s"] == 60.0
    assert seen["timing"].batch1_rows == tune.STARTUP_TIMING.batch1_rows and seen["timing"].batch_size == 16
    assert seen["timing"].full_depth_agreement == tune.STARTUP_TIMING.full_depth_agreement  # what a server does
    assert not seen["cache"].exists() and not (graphs / "tune").exists()
    assert (graphs / "onnx" / "exported.onnx").exists() and (graphs / "openvino").is_dir()
    assert run["choice"] == "onnxruntime-fp32" and run["batched_choice"] == "openvino-bf16"
    assert run["eligible_batch1_ms"] == {"onnxruntime-fp32": 1.4, "openvino-bf16": 1.6, "torch-bf16": 3.0}
    assert run["retimed"] == ["onnxruntime-fp32", "openvino-bf16"]
    assert run["retimed_batched"] == ["openvino-bf16", "torch-bf16"]
    assert run["candidate_seconds"] == {"onnxruntime-fp32": None, "openvino-bf16": None, "torch-bf16": 9.5}
    assert first_start_tune.tune_line(run) == (
        "onnxruntime-fp32 alone, openvino-bf16 in batches (retimed: alone onnxruntime-fp32 vs openvino-bf16; in"
        " batches openvino-bf16 vs torch-bf16), 30.0 s"
    )
    # A run recorded before the close call in batches existed reads as before.
    del run["retimed_batched"]
    assert first_start_tune.tune_line(run).endswith("(retimed: alone onnxruntime-fp32 vs openvino-bf16), 30.0 s")
