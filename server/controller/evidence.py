"""Shadow-sampled evidence: per text, what each rung of the ladder would have answered, and the window of it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LadderEvidence:
    """One shadow-sampled text, run to full depth: for every rung, whether an exit there would give the full
    model's label, and the layer (1..n) it would leave at."""

    agrees: tuple[bool, ...]
    exit_layers: tuple[int, ...]


@dataclass
class EvidenceWindow:
    """The evidence window: rows of per-rung agreement (bool) and exit layers, newest last."""

    capacity: int
    agrees: deque[np.ndarray] = field(default_factory=deque)
    exit_layers: deque[np.ndarray] = field(default_factory=deque)

    def add(self, evidence: LadderEvidence) -> None:
        self.agrees.append(np.asarray(evidence.agrees, dtype=bool))
        self.exit_layers.append(np.asarray(evidence.exit_layers, dtype=np.int16))
        while len(self.agrees) > self.capacity:
            self.agrees.popleft()
            self.exit_layers.popleft()

    def __len__(self) -> int:
        return len(self.agrees)
