"""Calibration: pick thresholds of an exit criterion on a dev set and store them as named presets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import Preset
from model.exit_rule import DEFAULT_CRITERION, ExitCriterion, get_criterion
from model.sweep import SweepPoint, Targets, simulate

# name → the most accuracy (as a fraction) it may lose against full depth on the dev set.
PRESET_TOLERANCES: dict[str, float] = {"lossless": 0.001, "balanced": 0.005, "fast": 0.02}


def calibrate(
    probabilities: torch.Tensor,
    entropies: torch.Tensor,
    labels: Targets,
    tolerances: dict[str, float] | None = None,
    criterion: ExitCriterion | None = None,
    reference_accuracy: float | None = None,
) -> list[Preset]:
    """For each preset, the threshold with the most expected saving whose dev accuracy is within its
    tolerance of full depth (ties: the most aggressive threshold; for entropy, simply the largest).

    `reference_accuracy` replaces these outputs' own full depth as the mark: a reduced-precision runtime's
    presets are calibrated on its own outputs but held to the fp32 model's full-depth accuracy, so a preset
    means the same accuracy budget against the model whichever runtime serves it. Where not even full depth
    meets a preset's mark, the preset is full depth (it exits nowhere early)."""
    rule = criterion or get_criterion(DEFAULT_CRITERION)
    points = simulate(probabilities, entropies, labels, rule.candidates(probabilities, entropies), rule)
    full = points[0].accuracy if reference_accuracy is None else reference_accuracy  # first candidate: full depth
    return choose_presets(points, full, tolerances or PRESET_TOLERANCES, rule)


def choose_presets(
    points: Sequence[SweepPoint], mark: float, tolerances: dict[str, float], rule: ExitCriterion
) -> list[Preset]:
    """For each preset, the point with the most expected saving whose score (`accuracy`: accuracy, or agreement
    with full depth) is within its tolerance of `mark` (ties: the most aggressive threshold); the first point,
    full depth, where none is."""
    presets = []
    for name, tolerance in tolerances.items():
        allowed = [p for p in points if p.accuracy >= mark - tolerance - 1e-12] or [points[0]]
        best = max(allowed, key=lambda p: (p.expected_saving, rule.aggressiveness(p.threshold)))
        presets.append(
            Preset(
                name=name,
                threshold=best.threshold,
                accuracy=best.accuracy,
                expected_saving=best.expected_saving,
                max_accuracy_drop=tolerance,
            )
        )
    return presets
