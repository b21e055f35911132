"""The agreement policy: the rung (the "base") whose agreement with full depth holds the target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.controller.statistics import WindowCounts, WindowTests
from server.controller.targets import Reason


@dataclass(frozen=True)
class BaseMove:
    """The agreement policy moving its rung."""

    to_rung: int
    reason: Reason
    evidence: str


class AgreementPolicy:
    """Holds `target` agreement: down at once when the base is shown below it, up only to rungs proven above it
    on evidence newer than the last move down, and no sooner than `min_dwell_s` after any move."""

    def __init__(
        self,
        target: float,
        start_rung: int,
        ladder: Sequence[float],
        tests: WindowTests,
        *,
        min_dwell_s: float,
        now: float,
    ) -> None:
        self.target = target
        self.rung = start_rung
        self.ladder = ladder
        self.tests = tests
        self.min_dwell_s = min_dwell_s
        self._last_move = now
        self._low_at = 0  # evidence rows ever received when the base last moved down

    def resume(self, rung: int) -> None:
        """Take up a saved rung; the evidence resumed with it counts as newer than any move."""
        self.rung = rung
        self._low_at = 0  # every resumed row may raise the base

    def decide(self, rows: list[np.ndarray], received: int, counts: WindowCounts, now: float) -> BaseMove | None:
        """`rows`: the evidence window, newest last; `received`: rows ever recorded; `counts`: `rows` counted."""
        base, target = self.rung, self.target
        shortfall = self.tests.below(counts, base, target)
        if shortfall is not None:
            new = next((r for r in range(base - 1, 0, -1) if self.tests.below(counts, r, target) is None), 0)
            self._low_at = received
            evidence = f"{self._at(base)}: {shortfall.describe()} < target {target}"
            return self._move(new, Reason.AGREEMENT_LOW, evidence, now)
        if now - self._last_move < self.min_dwell_s:
            return None
        # Raising looks only at evidence newer than the last drop: what came before it described traffic that
        # has since changed (the drop is the proof), and the long window would lift the default straight back.
        fresh = received - self._low_at
        recent = rows[len(rows) - fresh :] if fresh < len(rows) else rows
        recent_counts = self.tests.counts(recent)
        new, proof = base, None
        for rung in range(base + 1, len(self.ladder)):
            above = self.tests.above(recent_counts, rung, target)
            if above is None:
                break
            new, proof = rung, above
        if proof is None:
            return None
        return self._move(new, Reason.AGREEMENT_ROOM, f"{self._at(new)}: {proof.describe()} >= target {target}", now)

    def _at(self, rung: int) -> str:
        return f"agreement at {self.ladder[rung]:.4f}"

    def _move(self, new: int, reason: Reason, evidence: str, now: float) -> BaseMove:
        self.rung = new
        self._last_move = now
        return BaseMove(new, reason, evidence)
