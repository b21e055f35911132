"""Agreement as a proportion with its Wilson score interval, and the windowed tests on it that the policies read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class WindowCounts:
    """Agreeing samples per rung over each window that has enough samples (shortest window first), from the
    newest `rows` evidence rows."""

    counts: tuple[np.ndarray, ...]
    rows: int


@dataclass(frozen=True)
class WindowTests:
    """The two tests both policies read: is a rung shown below a level, or shown above it, in some window."""

    windows: tuple[int, ...]
    z: float = DEFAULT_Z
    z_below: float = DEFAULT_Z_BELOW
    min_samples: int = 30
    min_proof_samples: int = 400

    def counts(self, rows: Sequence[np.ndarray]) -> WindowCounts:
        """Per window with at least `min_samples` rows: the agreeing count per rung over its newest rows."""
        if not rows:
            return WindowCounts((), 0)
        stacked = np.stack(rows[-self.windows[-1] :])
        counts = []
        for window in self.windows:
            if len(stacked) < self.min_samples:
                break
            counts.append(stacked[-window:].sum(axis=0))
            if window >= len(stacked):
                break
        return WindowCounts(tuple(counts), len(stacked))

    def below(self, counts: WindowCounts, rung: int, level: float) -> Interval | None:
        """The first window whose interval at `rung` lies wholly below `level`, if any."""
        for count, window in zip(counts.counts, self.windows, strict=False):
            interval = Interval.of(int(count[rung]), min(window, counts.rows), self.z_below)
            if interval.upper < level:
                return interval
        return None

    def above(self, counts: WindowCounts, rung: int, level: float) -> Interval | None:
        """A window whose interval at `rung` lies wholly above `level`, provided every window's estimate is at
        or above it too: after a drift the long window still remembers the old traffic, the short one does not."""
        windows = list(zip(counts.counts, self.windows, strict=False))
        if any(int(count[rung]) < level * min(window, counts.rows) for count, window in windows):
            return None
        for count, window in windows:
            samples = min(window, counts.rows)
            if samples < self.min_proof_samples:
                continue  # a short window only ever shows a drop: tested every tick, it would prove by luck
            interval = Interval.of(int(count[rung]), samples, self.z)
            if interval.lower >= level:
                return interval
        return None
