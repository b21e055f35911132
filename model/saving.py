"""The paper's expected saving, written once: 1 − Σᵢ i·Nᵢ / (n·Σᵢ Nᵢ), with Nᵢ the samples that left at layer
i of n. Pure Python (no torch), so the load generator, the server's metrics, evaluation and the benchmarks all
count it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def exit_counts(exit_layers: Iterable[int], num_layers: int) -> list[int]:
    """Nᵢ for i = 1..n: how many samples left at each layer (layers numbered 1..n)."""
    counts = [0] * num_layers
    for layer in exit_layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"exit layer {layer} is outside 1..{num_layers}")
        counts[layer - 1] += 1
    return counts


def saving_from_totals(layers_executed: float, layers_possible: float) -> float | None:
    """1 − layers run / layers a full-depth pass would run (Σᵢ i·Nᵢ and n·Σᵢ Nᵢ); None when nothing ran."""
    if layers_possible <= 0:
        return None
    return 1.0 - layers_executed / layers_possible


def saving_from_counts(counts: Sequence[int]) -> float | None:
    """The expected saving of exit counts N₁..Nₙ; None when no sample was counted."""
    executed = sum(layer * count for layer, count in enumerate(counts, start=1))
    return saving_from_totals(executed, len(counts) * sum(counts))


def expected_saving(exit_layers: Iterable[int], num_layers: int) -> float | None:
    """The expected saving of a set of exit layers (1..n) on an n-layer model; None for no layers."""
    return saving_from_counts(exit_counts(exit_layers, num_layers))


def time_weighted_saving(
    exit_layers: Sequence[int], full_depth_times: Sequence[float], num_layers: int
) -> float | None:
    """The expected saving with each sample weighted by its own full-depth time: 1 − Σₛ tₛ·iₛ / (n·Σₛ tₛ),
    tₛ sample s's time at full depth and iₛ the layer it left at: the saving of a loop in which each layer
    costs an n-th of the sample's full-depth time and nothing else does. Below the paper's count when the
    samples that go deep are the slower (longer) ones. None for no samples."""
    if len(exit_layers) != len(full_depth_times):
        raise ValueError(f"{len(exit_layers)} exit layers for {len(full_depth_times)} times")
    for layer in exit_layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"exit layer {layer} is outside 1..{num_layers}")
    executed = sum(time * layer for time, layer in zip(full_depth_times, exit_layers, strict=True))
    return saving_from_totals(executed, num_layers * sum(full_depth_times))
