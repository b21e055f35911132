"""Targets instead of thresholds: moves the server's default threshold along a ladder (full depth at rung 0, the
ceiling last) to hold an agreement target (Wilson intervals over shadow-sampled evidence), a p99 target, or
both. Pure logic over a clock: the server feeds it evidence and latencies and calls `tick`; tests drive it with
a fake clock. How each policy decides, and why: docs/controller.md ("How it decides").

The package: `targets` (what it holds, why it moves), `statistics` (Wilson intervals and the windowed tests),
`evidence` (the shadow samples' window), `agreement` (the agreement policy: the base rung), `latency` (the
latency policy, a state machine: rungs pushed beyond the base), `persistence` (the state file), `controller`
(`ThresholdController`: the two policies over one ladder, fed by the server, on a clock).
"""

from server.controller.controller import ThresholdController
from server.controller.evidence import EvidenceWindow, LadderEvidence
from server.controller.latency import LatencyState
from server.controller.statistics import DEFAULT_Z, DEFAULT_Z_BELOW, Interval, wilson_interval
from server.controller.targets import Adjustment, Reason, Targets

__all__ = [
    "DEFAULT_Z",
    "DEFAULT_Z_BELOW",
    "Adjustment",
    "EvidenceWindow",
    "Interval",
    "LadderEvidence",
    "LatencyState",
    "Reason",
    "Targets",
    "ThresholdController",
    "wilson_interval",
]
