"""The paper's figures from an evaluation report, as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIGURES = {
    "accuracy_vs_saving": "fig2_accuracy_vs_saving.png",
    "expected_vs_measured": "fig3_expected_vs_measured_saving.png",
    "per_layer_accuracy": "fig4_per_layer_accuracy.png",
    "exit_distribution": "fig6_exit_distribution.png",
}


def plot_report(report: dict[str, Any], output: Path) -> list[Path]:
    """Write Figs. 2, 3, 4 and 6 of the paper for `report` into `output`; returns the paths."""
    sweep = report["sweep"]
    n = report["num_layers"]
    title = f"{report['model']} ({report['num_samples']} samples)"
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 4))
    rule = report.get("exit_criterion", "entropy")
    savings, accuracies = [100 * p["expected_saving"] for p in sweep], [100 * p["accuracy"] for p in sweep]
    ax.plot(savings, accuracies, "o-", label=f"{rule} exit")
    ax.axhline(100 * report["full_accuracy"], color="gray", ls="--", lw=1, label="full depth")
    for preset in report["presets"]:
        ax.plot(100 * preset["expected_saving"], 100 * preset["accuracy"], "s", label=f"preset {preset['name']}")
    oracle = report["oracle"]
    ax.plot(100 * oracle["expected_saving"], 100 * oracle["accuracy"], "*", ms=10, label="oracle")
    ax.set(xlabel="expected saving (%)", ylabel="accuracy (%)", title=f"Accuracy vs saving: {title}")
    ax.legend(fontsize=7)
    paths.append(_save(fig, output / FIGURES["accuracy_vs_saving"]))

    measured = [p for p in sweep if p["measured_saving"] is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [100 * p["expected_saving"] for p in measured]
        ax.plot(xs, [100 * p["measured_saving"] for p in measured], "o", label="measured (batch 1)")
        top = max(max(xs), 1.0)
        ax.plot([0, top], [0, top], "k--", lw=1, label="measured = expected")
        timing = report.get("timing", {})
        costs = timing.get("exit_costs")
        if costs is not None:
            # The report's fit: expected less the unsaved share and the off-ramps each sample passed.
            plain_ms = report["latency_ms"]["plain_full_forward"]
            expected_timed = timing["expected_saving_on_timed_samples"]
            fitted = [
                100 * (e * (1 - costs["unsaved_fraction"]) - costs["off_ramp_ms"] * x / plain_ms)
                for e, x in zip(expected_timed, timing["extra_off_ramps_per_sample"], strict=True)
            ]
            ax.plot(
                [100 * e for e in expected_timed],
                fitted,
                "x",
                color="tab:red",
                label=f"fit: {1000 * costs['off_ramp_ms']:.0f} µs per off-ramp passed, "
                f"{100 * costs['unsaved_fraction']:.1f}% unsaved",
            )
        ax.set(
            xlabel="expected saving (%)", ylabel="measured wall-clock saving (%)", title="Expected vs measured saving"
        )
        ax.legend(fontsize=8)
        paths.append(_save(fig, output / FIGURES["expected_vs_measured"]))

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(range(1, n + 1), [100 * a for a in report["per_layer_accuracy"]], "o-")
    ax.set(xlabel="exit layer", ylabel="accuracy (%)", title="Per-layer accuracy (all samples forced out)")
    ax.set_xticks(range(1, n + 1))
    paths.append(_save(fig, output / FIGURES["per_layer_accuracy"]))

    picks = _spread(sweep, 4)
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3), sharey=True, squeeze=False)
    for ax, point in zip(axes[0], picks, strict=True):
        ax.bar(range(1, n + 1), point["exit_counts"])
        ax.set(title=f"S={point['threshold']:.3g}", xlabel="exit layer")
        ax.set_xticks(range(1, n + 1))
    axes[0][0].set_ylabel("samples")
    fig.suptitle("Exit-layer distribution")
    paths.append(_save(fig, output / FIGURES["exit_distribution"]))
    return paths


def _spread(sweep: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    if len(sweep) <= count:
        return sweep
    step = (len(sweep) - 1) / (count - 1)
    return [sweep[round(i * step)] for i in range(count)]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
