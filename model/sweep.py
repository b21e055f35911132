"""Threshold sweeps over precomputed off-ramp outputs: accuracy, expected saving and exit counts per
threshold through the shared exit rule (`model.exit_rule`), and the oracle bound. Calibration and evaluation
both build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model import exit_rule
from model.saving import saving_from_counts


def binary_f1(predicted: torch.Tensor, target: torch.Tensor) -> float | None:
    """F1 of label 1 (GLUE's MRPC/QQP score) for two-class tasks; None for more classes."""
    if int(max(predicted.max(), target.max())) > 1:
        return None
    true_positive = int(((predicted == 1) & (target == 1)).sum())
    predicted_positive, actual_positive = int((predicted == 1).sum()), int((target == 1).sum())
    if predicted_positive + actual_positive == 0:
        return 0.0
    return 2 * true_positive / (predicted_positive + actual_positive)


# Labels to score against: label ids, or (multi-label) one 0/1 per label for each sample.
Targets = Sequence[int] | Sequence[Sequence[float]]


def answers(probabilities: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """What a classifier answers from probabilities [..., samples, labels]: the top label, or (multi-label)
    which labels are on (sigmoid >= 0.5)."""
    return probabilities >= exit_rule.LABEL_ON_PROBABILITY if multi_label else probabilities.argmax(dim=-1)


def same_answer(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Per sample: whether two answers (from `answers`, or label ids / multi-hot targets) are the same
    (multi-label: every label)."""
    return (a == b.to(a.dtype)).all(dim=-1) if multi_label else a == b


def correct(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether each answer is right, [..., samples] from probabilities [..., samples, labels]: the label ids'
    argmax, or (a 2-D multi-hot `target`) exactly the set of labels on (subset accuracy)."""
    multi_label = target.dim() == 2
    return same_answer(answers(probabilities, multi_label), target, multi_label)


def exit_counts(exit_layers: torch.Tensor, num_layers: int) -> list[int]:
    """N_i: samples that left at layer i, for i = 1..n (input: 0-based layers)."""
    return torch.bincount(exit_layers.reshape(-1), minlength=num_layers).tolist()  # type: ignore[no-any-return]


@dataclass
class SweepPoint:
    threshold: float
    accuracy: float
    expected_saving: float
    exit_counts: list[int]
    measured_saving: float | None = None
    f1: float | None = None


def simulate(
    probabilities: torch.Tensor,
    entropies: torch.Tensor,
    labels: Targets,
    thresholds: Sequence[float],
    criterion: exit_rule.ExitCriterion | None = None,
) -> list[SweepPoint]:
    """Accuracy, expected saving and exit counts for each threshold, via the shared exit rule
    (default: DeeBERT's entropy criterion). Multi-label targets score subset accuracy and no F1."""
    rule = criterion or exit_rule.get_criterion(exit_rule.DEFAULT_CRITERION)
    num_layers = entropies.shape[0]
    target = torch.tensor(labels)
    right = correct(probabilities, target)  # [layers, samples]
    single_two_class = target.dim() == 1 and probabilities.shape[-1] == 2
    predictions = probabilities.argmax(-1)  # [layers, samples]
    sweep = torch.tensor(thresholds, dtype=torch.float32).unsqueeze(-1)
    layers = rule.first_exit_layers(probabilities, entropies, sweep)
    points = []
    for row, threshold in enumerate(thresholds):
        exit_layer = layers[row].unsqueeze(0)
        counts = exit_counts(exit_layer, num_layers)
        predicted = predictions.gather(0, exit_layer).squeeze(0)
        points.append(
            SweepPoint(
                threshold=float(threshold),
                accuracy=float(right.gather(0, exit_layer).float().mean()),
                expected_saving=saving_from_counts(counts) or 0.0,
                exit_counts=counts,
                f1=binary_f1(predicted, target) if single_two_class else None,
            )
        )
    return points


def oracle(probabilities: torch.Tensor, labels: Targets) -> dict[str, float]:
    """Exit at the first layer whose off-ramp is right (the last when none is): the limit of any exit rule."""
    num_layers = probabilities.shape[0]
    right = correct(probabilities, torch.tensor(labels))
    any_correct = right.any(dim=0)
    first_correct = right.to(torch.int8).argmax(dim=0)
    exit_layer = torch.where(any_correct, first_correct, torch.full_like(first_correct, num_layers - 1))
    counts = exit_counts(exit_layer, num_layers)
    return {"accuracy": float(any_correct.float().mean()), "expected_saving": saving_from_counts(counts) or 0.0}
