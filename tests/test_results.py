"""docs/RESULTS.md generation from saved reports: tables, verdict, figures, machine-readable summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reports.results import SCHEMES, scheme_verdict, write_results


def fake_report(
    full: float, balanced_saving: float, criterion: str = "entropy", f1: float | None = None
) -> dict[str, Any]:
    point = {"threshold": 0.2, "accuracy": full - 0.004, "f1": f1, "expected_saving": balanced_saving}
    sweep = [
        {"threshold": 0.0, "accuracy": full, "expected_saving": 0.0, "measured_saving": 0.0, "exit_counts": [0, 10]},
        {"threshold": 0.2, "accuracy": full - 0.004, "expected_saving": balanced_saving, "measured_saving": 0.3,
         "exit_counts": [6, 4]},
    ]  # fmt: skip
    tolerance = [{"name": n, "threshold": 0.2, "max_accuracy_drop": 0.005, "accuracy": full - 0.004,
                  "expected_saving": balanced_saving} for n in ("lossless", "balanced", "fast")]  # fmt: skip
    return {
        "model": "m",
        "num_layers": 2,
        "num_samples": 10,
        "exit_criterion": criterion,
        "full_accuracy": full,
        "full_f1": f1,
        "per_layer_accuracy": [full - 0.1, full],
        "per_layer_f1": None,
        "sweep": sweep,
        "oracle": {"accuracy": 0.99, "expected_saving": 0.6},
        "presets": [{"name": n, **point} for n in ("lossless", "balanced", "fast")] if criterion == "entropy" else [],
        "calibrated_on_this_data": tolerance,
        "machine": {"cpu": "test cpu", "cpus_usable": 2, "versions": {"torch": "x"}},
        "timing": {"threads": 2},
    }


def write(directory: Path, report: dict[str, Any], seconds: float | None = 60.0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report))
    if seconds is not None:
        (directory / "training_log.json").write_text(json.dumps({"total_seconds": seconds}))


def test_results_doc_has_every_section_from_the_reports(tmp_path: Path) -> None:
    write(tmp_path / "weights/sst2-minilm-l6/evaluation", fake_report(0.9, 0.5))
    write(tmp_path / "weights/mrpc-minilm-l6/evaluation", fake_report(0.8, 0.3, f1=0.85))
    # RTE not run: the table says so instead of failing.
    for index, scheme in enumerate(SCHEMES):
        write(tmp_path / "docs/results/schemes" / scheme, fake_report(0.85 + index / 100, 0.4))
    for criterion in ("entropy", "max-prob", "patience"):
        write(tmp_path / "docs/results/criteria" / criterion, fake_report(0.9, 0.5, criterion), seconds=None)
    output = tmp_path / "docs/RESULTS.md"
    summary = write_results(tmp_path, output, "Hand-written discussion.")
    text = output.read_text()
    assert "| SST-2 |" in text and "| MRPC |" in text and "| RTE | entailment" in text and "not run" in text
    assert "80.00 / 85.0" in text  # MRPC: accuracy / F1
    assert "`weighted-joint`" in text and "t=0.2: 89.60 / 50.0 (measured 30.0)" in text
    assert "## Discussion" in text and "Hand-written discussion." in text
    assert "test cpu" in text
    for figure in ("tasks_per_layer.png", "schemes_tradeoff.png", "criteria_tradeoff.png"):
        assert (tmp_path / "docs/results" / figure).stat().st_size > 0
    saved = json.loads((tmp_path / "docs/results/results.json").read_text())
    assert set(saved) == set(summary) == {"tasks", "schemes", "criteria"}
    assert saved["tasks"]["MRPC"]["full"]["f1"] == 0.85


def test_two_stage_stays_default_unless_beaten_on_both_axes() -> None:
    def result(accuracy: float, saving: float) -> dict[str, Any]:
        return {"full_accuracy": accuracy, "balanced": {"expected_saving": saving}}

    kept = scheme_verdict({"two-stage": result(0.9, 0.5), "joint": result(0.91, 0.4), "distill": result(0.89, 0.6)})
    assert "stays the default" in " ".join(kept)
    beaten = scheme_verdict({"two-stage": result(0.9, 0.5), "joint": result(0.91, 0.55)})
    assert "`joint` beats `two-stage`" in " ".join(beaten)
    tied = " ".join(scheme_verdict({"two-stage": result(0.9, 0.5), "distill": result(0.9, 0.55)}))
    assert "stays the default" in tied and "`distill` ties `two-stage`" in tied


def test_one_percentage_formatter_for_every_report() -> None:
    from reports.common import percent

    assert percent(0.1234) == "12.3%" and percent(None) == "-"
    assert percent(0.05, signed=True) == "+5.0%" and percent(-0.05, signed=True) == "-5.0%"
    assert percent(0.5, 2, unit="", missing="–") == "50.00" and percent(None, missing="–") == "–"


def test_cpu_time_stolen_by_the_hypervisor_is_a_share_of_the_time_between_two_readings(tmp_path: Path) -> None:
    from reports.common import cpu_times, stolen_share

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\nintr 1 2 3\n")
    before = cpu_times(stat)
    assert before == {"user": 100, "nice": 0, "system": 50, "idle": 800, "iowait": 10, "irq": 0, "softirq": 5,
                      "steal": 35}  # fmt: skip
    stat.write_text("cpu  160 0 60 900 10 0 5 65 0 0\n")  # 200 ticks passed, 30 of them stolen
    assert stolen_share(before, cpu_times(stat)) == pytest.approx(0.15)
    assert stolen_share(before, before) is None, "no time passed: no share"
    assert cpu_times(tmp_path / "absent") is None and stolen_share(None, before) is None
    stat.write_text("cpu  1 2 3\n")  # an old kernel without steal: not a reading
    assert cpu_times(stat) is None
