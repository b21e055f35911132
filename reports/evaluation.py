"""An evaluation report (`model.evaluate.evaluate`) laid out: report.json, sweep.csv and the paper's figures on
disk, and the summary `deebert evaluate` prints."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from reports.figures import plot_report


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
    """A short terminal table of the sweep and presets."""
    lines = [
        f"{report['model']}: {report['num_samples']} samples, {report['num_layers']} layers, "
        f"full-depth accuracy {100 * report['full_accuracy']:.2f}%",
        "per-layer accuracy: " + " ".join(f"L{i}={100 * a:.1f}" for i, a in enumerate(report["per_layer_accuracy"], 1)),
        f"{'threshold':>9} {'accuracy':>8} {'expected':>8} {'measured':>8}  exits per layer",
    ]
    for p in report["sweep"]:
        measured = "" if p["measured_saving"] is None else f"{100 * p['measured_saving']:.1f}%"
        lines.append(
            f"{p['threshold']:>9.3f} {100 * p['accuracy']:>7.2f}% {100 * p['expected_saving']:>7.1f}% {measured:>8}  "
            + " ".join(str(c) for c in p["exit_counts"])
        )
    best = report["oracle"]
    lines.append(f"oracle: accuracy {100 * best['accuracy']:.2f}%, saving {100 * best['expected_saving']:.1f}%")
    for preset in report["presets"]:
        lines.append(
            f"preset {preset['name']:<9} threshold {preset['threshold']:.4f}: "
            f"accuracy {100 * preset['accuracy']:.2f}%, expected saving {100 * preset['expected_saving']:.1f}%"
            + ("" if preset["measured_saving"] is None else f", measured {100 * preset['measured_saving']:.1f}%")
        )
    if "latency_ms" in report:
        latency = report["latency_ms"]
        timing = report.get("timing", {})
        lines.append(
            f"batch-1 latency on {timing.get('device', 'cpu')} ({timing.get('dtype', 'float32')}): "
            f"plain full forward {latency['plain_full_forward']:.2f} ms, "
            f"exit loop at full depth {latency['exit_loop_threshold_0']:.2f} ms "
            f"({100 * latency['exit_loop_overhead_at_threshold_0']:+.1f}%)"
        )
    costs = report.get("timing", {}).get("exit_costs")
    if costs is not None:
        lines.append(
            f"measured trails expected by: {1000 * costs['off_ramp_ms']:.0f} µs per off-ramp a sample passes "
            f"({100 * costs['off_ramp_fraction_of_plain_forward']:.1f}% of a plain forward) and "
            f"{100 * costs['unsaved_fraction']:.1f}% of a plain forward outside the layers (fitted over the sweep)"
        )
    return "\n".join(lines)
