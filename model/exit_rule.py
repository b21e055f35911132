"""The one exit rule of DeeBERT: leave at the first layer whose off-ramp entropy is below the threshold.

Every place that decides an exit (the layer-by-layer loop, evaluation sweeps, calibration) goes through
these functions, so the served behaviour and the reported numbers cannot drift apart.
"""

from __future__ import annotations

import math

import torch


def entropy_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and entropy (nats) of each row's softmax, stably from log_softmax in fp32."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probabilities = log_probs.exp()
    entropy = -(probabilities * log_probs).sum(dim=-1)
    return probabilities, entropy


def exits(entropy: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Which rows leave at this layer: `entropy < threshold` (so threshold 0 never exits early)."""
    return entropy < threshold


def can_exit_early(max_threshold: float) -> bool:
    """False when no row can leave before the last layer, so intermediate off-ramps can be skipped."""
    return max_threshold > 0.0


def first_exit_layers(entropies: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """0-based exit layer per sample from precomputed entropies [layers, samples].

    `thresholds` is [samples] (one per sample) or [sweep, 1] (a sweep of thresholds, giving
    [sweep, samples]). The last layer always exits. Vectorised twin of the loop in `DeeBert.iter_exits`.
    """
    leaves = exits(entropies, thresholds.unsqueeze(-2))
    leaves[..., -1, :] = True
    # argmax returns the first True along the layer axis.
    return leaves.to(torch.int8).argmax(dim=-2)


def expected_saving(exit_counts: list[int]) -> float:
    """The paper's expected saving 1 - Σ i·N_i / (n·Σ N_i), with N_i the samples that left at layer i of n."""
    num_layers = len(exit_counts)
    total = sum(exit_counts)
    if total == 0 or num_layers == 0:
        return 0.0
    layers_run = sum(layer * count for layer, count in enumerate(exit_counts, start=1))
    return 1.0 - layers_run / (num_layers * total)


def validate_threshold(value: float) -> float:
    """A threshold must be a finite number >= 0; raises ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"threshold must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"threshold must be finite, got {value}")
    if value < 0:
        raise ValueError(f"threshold must be >= 0, got {value}")
    return float(value)
