"""Agreement as a proportion with its Wilson score interval: what the controller's decisions read."""

from __future__ import annotations

import math
from dataclasses import dataclass

# z of a 90 % two-sided interval: each side is a 95 % one-sided bound.
DEFAULT_Z = 1.645
# z of the test that a rung is *below* a level: stricter (99.5 % one-sided), since it runs on three windows
# at every tick and a false alarm moves the default for nothing. Simulated (tests/test_controller.py's
# streams, 20 000 samples at agreement 0.995 against a target of 0.99, 5 seeds): z = 1.645 moved the default
# 9-32 times; 2.576 moved it twice in 2 seeds (one false alarm, and back), never in 3; 3.09 never, but it
# missed the shipped model's drift from SST-2 to MRPC/RTE text at `fast` (0.953 -> 0.91 against 0.95) for
# over 400 samples. A drop to 0.85 was acted on within 10-110 samples with 2.576.
DEFAULT_Z_BELOW = 2.576


@dataclass(frozen=True)
class Interval:
    """Agreement at one rung over one window: agreeing samples of `samples`, and its Wilson interval."""

    agreeing: int
    samples: int
    lower: float
    upper: float

    @classmethod
    def of(cls, agreeing: int, samples: int, z: float) -> Interval:
        """`agreeing` of `samples` with its Wilson interval at `z`."""
        return cls(agreeing, samples, *wilson_interval(agreeing, samples, z))

    @property
    def estimate(self) -> float:
        return self.agreeing / self.samples if self.samples else math.nan

    def describe(self) -> str:
        return f"{self.estimate:.4f} [{self.lower:.4f}, {self.upper:.4f}] over {self.samples}"


def wilson_interval(agreeing: int, samples: int, z: float = DEFAULT_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion (agreeing of samples); (0, 1) without samples."""
    if samples <= 0:
        return 0.0, 1.0
    p = agreeing / samples
    z2 = z * z
    centre = (p + z2 / (2 * samples)) / (1 + z2 / samples)
    half = z * math.sqrt(p * (1 - p) / samples + z2 / (4 * samples * samples)) / (1 + z2 / samples)
    return max(0.0, centre - half), min(1.0, centre + half)
