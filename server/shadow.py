"""Shadow full-depth sampling: how often is the early exit's label the full model's label?

A fraction of answered texts is sampled. A text that already ran to the last layer agrees by
definition; the others are queued as background work and run again to full depth on the batch thread
while no text waits (never ahead of a request), and `deebert_exit_agreement_total{agree}` counts the
outcome. Drift in the calibration (inputs unlike the dev set) shows up as a falling agreement.

With a threshold controller (`server/controller.py`), each sampled text's full-depth run also yields every
off-ramp's output, so it tells what every rung of the controller's ladder would have answered
(`LadderEvidence`); then texts that already ran to full depth are sampled too (an earlier rung might
have answered them differently).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from server.controller import LadderEvidence
from server.engine import LadderExits

# One sampled text waiting for its full-depth run: (tokenized item, early-exit label id).
ShadowJob = tuple[Any, int]


class ShadowSampler:
    """Decides which texts to re-run at full depth, and compares the labels when they have run."""

    def __init__(
        self,
        fraction: float,
        num_layers: int,
        full_depth_labels: Callable[[list[Any]], list[int]],
        on_compared: Callable[[bool], None],
        rng: random.Random | None = None,
        ladder_evidence: Callable[[list[Any]], list[LadderExits]] | None = None,
        on_evidence: Callable[[LadderEvidence], None] | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"shadow fraction must be within [0, 1], got {fraction}")
        self.fraction = fraction
        self.num_layers = num_layers
        self._full_depth_labels = full_depth_labels
        self._on_compared = on_compared
        self._rng = rng or random.Random()
        if (ladder_evidence is None) != (on_evidence is None):
            raise ValueError("ladder_evidence and on_evidence come together")
        self._ladder_evidence = ladder_evidence
        self._on_evidence = on_evidence

    def sample(self, item: Any, exit_layer: int, label_id: int) -> ShadowJob | None:
        """For one answered text: a job to run at full depth, or None (not sampled, or already full depth)."""
        if self.fraction < 1.0 and self._rng.random() >= self.fraction:
            return None
        if exit_layer >= self.num_layers and self._ladder_evidence is None:
            self._on_compared(True)  # it already is the full model's answer
            return None
        return (item, label_id)

    def compare(self, jobs: list[ShadowJob]) -> None:
        """Run the jobs' texts to full depth (worker thread) and count agreement per text."""
        items = [item for item, _ in jobs]
        if self._ladder_evidence is None:
            full = self._full_depth_labels(items)
        else:
            assert self._on_evidence is not None
            outcomes = self._ladder_evidence(items)
            full = [outcome.full_label for outcome in outcomes]
            for outcome in outcomes:
                self._on_evidence(LadderEvidence(outcome.agrees, outcome.exit_layers))
        for (_, early), label in zip(jobs, full, strict=True):
            self._on_compared(early == label)
