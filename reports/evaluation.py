"""An evaluation report (`model.evaluate.evaluate`) laid out: report.json, sweep.csv and the paper's figures on
disk, and the summary `deebert evaluate` prints."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from reports.common import number, percent
from reports.figures import plot_report
from reports.terminal import table


def write_report(report: dict[str, Any], output: Path) -> None:
    """report.json, sweep.csv and the figures (paper Figs. 2, 3, 4, 6) into `output`."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    n = report["num_layers"]
    with (output / "sweep.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "threshold",
                "accuracy",
                "expected_saving",
                "measured_saving",
                *[f"exits_layer_{i}" for i in range(1, n + 1)],
            ]
        )
        for point in report["sweep"]:
            writer.writerow(
                [
                    point["threshold"],
                    point["accuracy"],
                    point["expected_saving"],
                    point["measured_saving"],
                    *point["exit_counts"],
                ]
            )
    plot_report(report, output)


def format_table(report: dict[str, Any]) -> str:
    """A short terminal summary: the sweep and the presets as tables, the rest in sentences."""
    sweep = table(
        ["threshold", "accuracy", "expected", "measured", "exits per layer"],
        [
            [
                f"{p['threshold']:.3f}",
                percent(p["accuracy"], 2),
                percent(p["expected_saving"]),
                percent(p["measured_saving"], missing=""),
                " ".join(str(c) for c in p["exit_counts"]),
            ]
            for p in report["sweep"]
        ],
        align=">>>><",
    )
    best = report["oracle"]
    lines = [
        f"{report['model']}: {report['num_samples']} samples, {report['num_layers']} layers, "
        f"full-depth accuracy {percent(report['full_accuracy'], 2)}",
        "per-layer accuracy: " + " ".join(f"L{i}={100 * a:.1f}" for i, a in enumerate(report["per_layer_accuracy"], 1)),
        sweep,
        f"oracle: accuracy {percent(best['accuracy'], 2)}, saving {percent(best['expected_saving'])}",
    ]
    if report["presets"]:
        lines.append(
            table(
                ["preset", "threshold", "accuracy", "expected saving", "measured saving"],
                [
                    [
                        preset["name"],
                        f"{preset['threshold']:.4f}",
                        percent(preset["accuracy"], 2),
                        percent(preset["expected_saving"]),
                        percent(preset["measured_saving"], missing=""),
                    ]
                    for preset in report["presets"]
                ],
                align="<>>>>",
            )
        )
    if "latency_ms" in report:
        latency = report["latency_ms"]
        timing = report.get("timing", {})
        lines.append(
            f"batch-1 latency on {timing.get('device', 'cpu')} ({timing.get('dtype', 'float32')}): "
            f"plain full forward {number(latency['plain_full_forward'], 2, ' ms')}, "
            f"exit loop at full depth {number(latency['exit_loop_threshold_0'], 2, ' ms')} "
            f"({percent(latency['exit_loop_overhead_at_threshold_0'], signed=True)})"
        )
    costs = report.get("timing", {}).get("exit_costs")
    if costs is not None:
        lines.append(
            f"measured trails expected by: {1000 * costs['off_ramp_ms']:.0f} µs per off-ramp a sample passes "
            f"({percent(costs['off_ramp_fraction_of_plain_forward'])} of a plain forward) and "
            f"{percent(costs['unsaved_fraction'])} of a plain forward outside the layers (fitted over the sweep)"
        )
    return "\n".join(lines)
