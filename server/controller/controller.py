"""The threshold controller: the default threshold's rung from both policies (agreement sets the base, latency
pushes beyond it within the agreement floor), the evidence and latencies they read, its clock, its state file."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.controller.agreement import AgreementPolicy
from server.controller.evidence import EvidenceWindow, LadderEvidence
from server.controller.latency import MIN_LATENCY_SAMPLES, LatencyPolicy, LatencyReading
from server.controller.persistence import read_state, state_document, write_state
from server.controller.statistics import DEFAULT_Z, DEFAULT_Z_BELOW, Interval, WindowCounts, WindowTests
from server.controller.targets import Adjustment, Reason, Targets

logger = logging.getLogger("deebert.controller")

DEFAULT_WINDOWS = (100, 400, 2000)


class ThresholdController:
    """Moves the default threshold along `ladder` (full depth first, ceiling last) to hold `targets`."""

    def __init__(
        self,
        ladder: Sequence[float],
        start_rung: int,
        targets: Targets,
        num_layers: int,
        *,
        windows: Sequence[int] = DEFAULT_WINDOWS,
        z: float = DEFAULT_Z,
        z_below: float = DEFAULT_Z_BELOW,
        min_samples: int = 30,
        min_proof_samples: int = 400,
        min_dwell_s: float = 5.0,
        latency_window_s: float = 5.0,
        recover_s: float = 2.0,
        latency_memory_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        saving: Callable[[float, float], float | None] | None = None,
        on_change: Callable[[Adjustment], None] | None = None,
    ) -> None:
        if len(ladder) < 2:
            raise ValueError("the ladder needs at least two rungs (full depth and a ceiling)")
        if not 0 <= start_rung < len(ladder):
            raise ValueError(f"start rung {start_rung} is outside the ladder (0..{len(ladder) - 1})")
        self.ladder = [float(value) for value in ladder]
        self.targets = targets
        self.num_layers = num_layers
        self.windows = tuple(sorted(windows))
        self.z = z
        self.tests = WindowTests(self.windows, z, z_below, min_samples, min_proof_samples)
        self.latency_window_s = latency_window_s
        self.latency_memory_s = latency_memory_s
        self._clock = clock
        self._saving = saving
        self._on_change = on_change or (lambda adjustment: None)
        self.configured_rung = start_rung
        now = clock()
        self._agreement = (
            AgreementPolicy(targets.agreement, start_rung, self.ladder, self.tests, min_dwell_s=min_dwell_s, now=now)
            if targets.agreement is not None
            else None
        )
        self._latency = (
            LatencyPolicy(targets.p99_s, self.ceiling_rung, recover_s=recover_s, memory_s=latency_memory_s, now=now)
            if targets.p99_s is not None
            else None
        )
        self._lock = threading.Lock()
        self._evidence = EvidenceWindow(self.windows[-1])
        self._received = 0  # evidence ever recorded
        self._latencies: deque[tuple[float, float]] = deque()
        self._started = now
        self._last_push_move = now
        self.p99_s: float | None = None
        self.adjustments: list[Adjustment] = []

    # --- what the server reads --------------------------------------------------------------------

    @property
    def ceiling_rung(self) -> int:
        return len(self.ladder) - 1

    @property
    def _base(self) -> int:
        """The agreement's rung (the configured default without an agreement target)."""
        return self._agreement.rung if self._agreement is not None else self.configured_rung

    @property
    def _push(self) -> int:
        """Rungs beyond the base that latency asks for."""
        return self._latency.push if self._latency is not None else 0

    @property
    def rung(self) -> int:
        """The rung the default threshold is on now."""
        return min(self._base + self._push, self.ceiling_rung)

    @property
    def threshold(self) -> float:
        """The default threshold now."""
        return self.ladder[self.rung]

    @property
    def samples(self) -> int:
        """Shadow samples in the evidence window."""
        return len(self._evidence)

    def intervals(self, rung: int) -> dict[int, Interval]:
        """Agreement at `rung` over each window (the newest 100, 400, 2000 samples), from one copy of the
        evidence; empty without evidence."""
        with self._lock:
            rows = list(self._evidence.agrees)
        if not rows:
            return {}
        column = np.stack(rows)[:, rung]
        return {
            window: Interval.of(int(column[-window:].sum()), len(column[-window:]), self.z) for window in self.windows
        }

    def interval(self, rung: int, window: int | None = None) -> Interval:
        """Agreement at `rung` over the newest `window` samples (default: the whole window)."""
        return self.intervals(rung).get(window or self.windows[-1], Interval.of(0, 0, self.z))

    def saving_at(self, rung: int) -> float | None:
        """The paper's expected saving at `rung` over the evidence window (with the `saving` function given);
        None without one, or without evidence."""
        with self._lock:
            layers = list(self._evidence.exit_layers)
        if not layers or self._saving is None:
            return None
        return self._saving(float(np.stack(layers)[:, rung].sum()), float(len(layers) * self.num_layers))

    def snapshot(self) -> dict[str, Any]:
        """What `GET /v1/model` shows: the live default, the targets, and the evidence behind them."""
        rung = self.rung
        agreement = {str(window): self._jsonable(interval) for window, interval in self.intervals(rung).items()}
        return {
            "threshold": self.threshold,
            "rung": rung,
            "ladder": self.ladder,
            "configured_threshold": self.ladder[self.configured_rung],
            "target_agreement": self.targets.agreement,
            "target_p99_ms": None if self.targets.p99_s is None else self.targets.p99_s * 1000,
            "agreement_floor": self.targets.floor if self.targets.p99_s is not None else None,
            "agreement": agreement,
            "expected_saving": self.saving_at(rung),
            "samples": self.samples,
            "p99_ms": None if self.p99_s is None else self.p99_s * 1000,
            "latency_rungs": self._push,
            "latency_state": None if self._latency is None else self._latency.state.value,
        }

    @staticmethod
    def _jsonable(interval: Interval) -> dict[str, float | int | None]:
        estimate = interval.estimate
        return {
            "estimate": None if math.isnan(estimate) else estimate,
            "lower": interval.lower,
            "upper": interval.upper,
            "samples": interval.samples,
        }

    # --- what the server feeds in (any thread) ------------------------------------------------------

    def record_evidence(self, evidence: LadderEvidence) -> None:
        """One shadow-sampled text's agreement at every rung."""
        if len(evidence.agrees) != len(self.ladder) or len(evidence.exit_layers) != len(self.ladder):
            raise ValueError(f"evidence for {len(evidence.agrees)} rungs; the ladder has {len(self.ladder)}")
        with self._lock:
            self._evidence.add(evidence)
            self._received += 1

    def record_latency(self, seconds: float) -> None:
        """One request's time in the server (kept only for a latency target)."""
        if self.targets.p99_s is None:
            return
        with self._lock:
            self._latencies.append((self._clock(), seconds))

    # --- deciding ---------------------------------------------------------------------------------

    def tick(self, queue_wait_s: float = 0.0) -> list[Adjustment]:
        """Let each policy look at its evidence and move the default if a target asks for it; the moves made."""
        now = self._clock()
        with self._lock:
            rows = list(self._evidence.agrees)
            received = self._received
            cutoff = max(self._last_push_move, now - self.latency_window_s)
            while self._latencies and self._latencies[0][0] < now - self.latency_window_s:
                self._latencies.popleft()
            recent = [seconds for at, seconds in self._latencies if at >= cutoff]
            window = [seconds for _, seconds in self._latencies]
        counts = self.tests.counts(rows)
        moves: list[Adjustment] = []
        if self._agreement is not None and counts.counts:
            before = self.rung
            base_move = self._agreement.decide(rows, received, counts, now)
            if base_move is not None:
                moves.append(self._adjustment(base_move.reason, before, base_move.evidence))
        if self._latency is not None:
            before = self.rung
            push_move = self._latency.decide(
                self._reading(recent, window, queue_wait_s, now), base=self._base, now=now, **self._limit(counts)
            )
            if push_move is not None:
                self._last_push_move = now
                moves.append(self._adjustment(push_move.reason, before, push_move.evidence))
        for move in moves:
            self.adjustments.append(move)
            logger.info(
                "default threshold %.4f -> %.4f (rung %d -> %d of %d): %s; %s",
                move.from_threshold,
                move.to_threshold,
                move.from_rung,
                move.to_rung,
                self.ceiling_rung,
                move.reason.value,
                move.evidence,
            )
            self._on_change(move)
        return moves

    def _reading(self, recent: list[float], window: list[float], queue_wait_s: float, now: float) -> LatencyReading:
        self.p99_s = float(np.quantile(recent, 0.99)) if len(recent) >= MIN_LATENCY_SAMPLES else None
        span = min(self.latency_window_s, now - self._started)
        return LatencyReading(
            p99_s=self.p99_s,
            requests=len(recent),
            window_p99_s=float(np.quantile(window, 0.99)) if len(window) >= MIN_LATENCY_SAMPLES else None,
            window_requests=len(window),
            queue_wait_s=queue_wait_s,
            request_rate=len(window) / span if span > 0 else 0.0,
        )

    def _limit(self, counts: WindowCounts) -> dict[str, Any]:
        """The most aggressive rung latency may push to: the ceiling, or the rung before the first (from the
        base up) whose agreement is shown below the floor; and that evidence."""
        floor = self.targets.floor
        if floor is not None:
            for rung in range(self._base + 1, self.ceiling_rung + 1):
                below = self.tests.below(counts, rung, floor)
                if below is not None:
                    evidence = f"agreement at {self.ladder[rung]:.4f}: {below.describe()} < floor"
                    return {"limit": rung - 1, "floor_evidence": evidence}
        return {"limit": self.ceiling_rung, "floor_evidence": None}

    def _adjustment(self, reason: Reason, before: int, evidence: str) -> Adjustment:
        after = self.rung
        return Adjustment(reason, before, after, self.ladder[before], self.ladder[after], evidence)

    # --- resuming (DEEBERT_CONTROLLER_STATE) --------------------------------------------------------

    def state(self, model: str, criterion: str) -> dict[str, Any]:
        """What a restarted server needs to resume: the rungs, the latency push and the evidence window."""
        with self._lock:
            agrees = [row.tolist() for row in self._evidence.agrees]
            layers = [row.tolist() for row in self._evidence.exit_layers]
        return state_document(model, criterion, self.ladder, self.ladder[self._base], self._push, agrees, layers)

    def save(self, path: Path, model: str, criterion: str) -> None:
        """Write the state atomically (a crash mid-write leaves the previous file)."""
        write_state(path, self.state(model, criterion))

    def resume(self, path: Path, model: str, criterion: str) -> bool:
        """Take up a saved state if it is for this model and criterion; a missing, unreadable or foreign file
        is ignored with a warning (never a failed start). True when resumed."""
        saved = read_state(path, model, criterion, self.ladder)
        if saved is None:
            return False
        before = self.rung
        with self._lock:
            for row in saved.evidence:
                self._evidence.add(row)
            self._received = len(saved.evidence)
        rung = min(range(len(self.ladder)), key=lambda r: abs(self.ladder[r] - saved.threshold))
        if self._agreement is not None:
            self._agreement.resume(rung)
        else:
            self.configured_rung = rung
        if self._latency is not None:
            self._latency.resume(saved.latency_rungs)
        move = self._adjustment(Reason.RESUMED, before, f"{len(saved.evidence)} samples from {path}")
        logger.info("controller resumed at threshold %.4f (%s)", self.threshold, move.evidence)
        if move.from_rung != move.to_rung:
            self.adjustments.append(move)
            self._on_change(move)
        return True
