"""Calibration: pick entropy thresholds on a dev set and store them as named presets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import Preset
from model.evaluate import simulate

# name → the most accuracy (as a fraction) it may lose against full depth on the dev set.
PRESET_TOLERANCES: dict[str, float] = {"lossless": 0.001, "balanced": 0.005, "fast": 0.02}


def candidate_thresholds(entropies: torch.Tensor) -> list[float]:
    """Every threshold that changes some exit: 0 and the midpoints between distinct off-ramp entropies."""
    values = torch.unique(entropies[:-1].reshape(-1)).double()
    if values.numel() == 0:
        return [0.0]
    midpoints = ((values[1:] + values[:-1]) / 2).tolist()
    return [0.0, *midpoints, float(values[-1]) * 1.0001 + 1e-6]


def calibrate(
    probabilities: torch.Tensor,
    entropies: torch.Tensor,
    labels: Sequence[int],
    tolerances: dict[str, float] | None = None,
) -> list[Preset]:
    """For each preset, the largest threshold whose dev accuracy is within its tolerance of full depth."""
    tolerances = tolerances or PRESET_TOLERANCES
    points = simulate(probabilities, entropies, labels, candidate_thresholds(entropies))
    full = points[0].accuracy  # threshold 0 is full depth
    presets = []
    for name, tolerance in tolerances.items():
        allowed = [p for p in points if p.accuracy >= full - tolerance - 1e-12]
        best = max(allowed, key=lambda p: p.threshold)
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
