"""What the controller holds (targets), why it moves (reasons), and a move (adjustment)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why the default threshold moved (the `reason` label of `deebert_controller_adjustments_total`)."""

    AGREEMENT_LOW = "agreement_low"
    AGREEMENT_ROOM = "agreement_room"
    LATENCY_HIGH = "latency_high"
    LATENCY_RECOVERED = "latency_recovered"
    FLOOR = "agreement_floor"
    RESUMED = "resumed"


@dataclass(frozen=True)
class Targets:
    """What the controller holds. `agreement_floor` only matters when both targets are set."""

    agreement: float | None = None
    p99_s: float | None = None
    agreement_floor: float | None = None

    def __post_init__(self) -> None:
        for name in ("agreement", "agreement_floor"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be within (0, 1), got {value}")
        if self.p99_s is not None and self.p99_s <= 0:
            raise ValueError(f"the p99 target must be > 0, got {self.p99_s}")
        if self.agreement_floor is not None and self.agreement is not None and self.agreement_floor > self.agreement:
            raise ValueError(
                f"the agreement floor ({self.agreement_floor}) is above the agreement target ({self.agreement}): "
                "the floor is how far latency may trade agreement below the target"
            )

    @property
    def any(self) -> bool:
        return self.agreement is not None or self.p99_s is not None

    @property
    def floor(self) -> float | None:
        """The agreement latency may not push below: the floor if set, else the agreement target (if set)."""
        return self.agreement_floor if self.agreement_floor is not None else self.agreement


@dataclass(frozen=True)
class Adjustment:
    """One move of the default threshold, with the evidence behind it."""

    reason: Reason
    from_rung: int
    to_rung: int
    from_threshold: float
    to_threshold: float
    evidence: str
