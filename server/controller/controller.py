"""The threshold controller: both policies (agreement, latency) over one ladder, its clock, and its state file."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.controller.evidence import EvidenceWindow, LadderEvidence
from server.controller.statistics import DEFAULT_Z, DEFAULT_Z_BELOW, Interval
from server.controller.targets import Adjustment, Reason, Targets

logger = logging.getLogger("deebert.controller")

STATE_VERSION = 1
DEFAULT_WINDOWS = (100, 400, 2000)
# Latency: "threatened" while the queue wait exceeds this share of the target; "recovered" below LOW_WATER.
QUEUE_SHARE = 0.5
LOW_WATER = 0.5
MIN_LATENCY_SAMPLES = 20
# Latency steps back within `latency_memory_s` of a push only once the request rate is below this share of
# the rate at the push (a stabilization window, as Kubernetes' autoscaler keeps before scaling down).
RATE_FALLEN = 0.8
# Each probe that breaks the target again under the same load doubles that window, up to this many times
# `latency_memory_s`.
MAX_BACKOFF = 8


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
        self.z_below = z_below
        self.min_samples = min_samples
        self.min_proof_samples = min_proof_samples
        self.min_dwell_s = min_dwell_s
        self.latency_window_s = latency_window_s
        self.recover_s = recover_s
        self.latency_memory_s = latency_memory_s
        self._stabilize_s = latency_memory_s  # how long after a push the rate must fall before stepping back
        self._clock = clock
        self._saving = saving
        self._on_change = on_change or (lambda adjustment: None)
        self.configured_rung = start_rung
        self._base = start_rung  # the agreement's rung (the configured default without an agreement target)
        self._push = 0  # rungs beyond the base that latency asks for
        self._push_step = 1  # rungs the next latency push moves: doubles while the overload lasts
        self._broke: tuple[int, float] | None = None  # the rung a step back broke the target at, and when
        self._stepped_back_at: float | None = None  # when latency last moved the default back
        self._pushed: tuple[float, float] | None = None  # when latency last pushed, and the request rate then
        self._lock = threading.Lock()
        self._evidence = EvidenceWindow(self.windows[-1])
        self._received = 0  # evidence ever recorded
        self._low_at = 0  # `_received` when agreement last moved the default down: older evidence cannot raise it
        self._latencies: deque[tuple[float, float]] = deque()
        now = clock()
        self._started = now
        self._last_base_move = now
        self._last_push_move = now
        self.p99_s: float | None = None
        self.adjustments: list[Adjustment] = []

    # --- what the server reads --------------------------------------------------------------------

    @property
    def ceiling_rung(self) -> int:
        return len(self.ladder) - 1

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
        """Look at the evidence and move the default if the targets ask for it; the moves made."""
        now = self._clock()
        with self._lock:
            rows = list(self._evidence.agrees)
            fresh = self._received - self._low_at
            cutoff = max(self._last_push_move, now - self.latency_window_s)
            while self._latencies and self._latencies[0][0] < now - self.latency_window_s:
                self._latencies.popleft()
            recent = [seconds for at, seconds in self._latencies if at >= cutoff]
            window = [seconds for _, seconds in self._latencies]
        counts, size = self._windows(rows), min(len(rows), self.windows[-1])
        moves: list[Adjustment] = []
        if self.targets.agreement is not None and counts:
            moves += self._steer_agreement(counts, size, rows, fresh, now)
        if self.targets.p99_s is not None:
            moves += self._steer_latency(counts, size, recent, window, queue_wait_s, now)
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

    def _windows(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per window with enough samples: the agreeing count per rung over its newest rows."""
        if not rows:
            return []
        stacked = np.stack(rows[-self.windows[-1] :])
        counts = []
        for window in self.windows:
            if len(stacked) < self.min_samples:
                break
            counts.append(stacked[-window:].sum(axis=0))
            if window >= len(stacked):
                break
        return counts

    def _below(self, counts: list[np.ndarray], rows: int, rung: int, level: float) -> Interval | None:
        """The first window whose interval at `rung` lies wholly below `level`, if any."""
        for count, window in zip(counts, self.windows, strict=False):
            interval = Interval.of(int(count[rung]), min(window, rows), self.z_below)
            if interval.upper < level:
                return interval
        return None

    def _above(self, counts: list[np.ndarray], rows: int, rung: int, level: float) -> Interval | None:
        """A window whose interval at `rung` lies wholly above `level`, provided every window's estimate is at
        or above it too: after a drift the long window still remembers the old traffic, the short one does not."""
        windows = list(zip(counts, self.windows, strict=False))
        if any(int(count[rung]) < level * min(window, rows) for count, window in windows):
            return None
        for count, window in windows:
            samples = min(window, rows)
            if samples < self.min_proof_samples:
                continue  # a short window only ever shows a drop: tested every tick, it would prove by luck
            interval = Interval.of(int(count[rung]), samples, self.z)
            if interval.lower >= level:
                return interval
        return None

    def _steer_agreement(
        self, counts: list[np.ndarray], size: int, rows: list[np.ndarray], fresh: int, now: float
    ) -> list[Adjustment]:
        """`counts`: agreeing samples per rung in each window with enough of them (`_windows`), `size` rows."""
        target = self.targets.agreement
        assert target is not None
        base = self._base
        shortfall = self._below(counts, size, base, target)
        if shortfall is not None:
            new = next((r for r in range(base - 1, 0, -1) if self._below(counts, size, r, target) is None), 0)
            evidence = f"agreement at {self.ladder[base]:.4f}: {shortfall.describe()} < target {target}"
            self._low_at = self._received
            return [self._move_base(new, Reason.AGREEMENT_LOW, evidence, now)]
        if now - self._last_base_move < self.min_dwell_s:
            return []
        # Raising looks only at evidence newer than the last drop: what came before it described traffic that
        # has since changed (the drop is the proof), and the long window would lift the default straight back.
        recent = rows[len(rows) - fresh :] if fresh < len(rows) else rows
        counts = self._windows(recent)
        size = min(len(recent), self.windows[-1])
        new, proof = base, None
        for rung in range(base + 1, self.ceiling_rung + 1):
            above = self._above(counts, size, rung, target)
            if above is None:
                break
            new, proof = rung, above
        if new == base or proof is None:
            return []
        evidence = f"agreement at {self.ladder[new]:.4f}: {proof.describe()} >= target {target}"
        return [self._move_base(new, Reason.AGREEMENT_ROOM, evidence, now)]

    def _move_base(self, new: int, reason: Reason, evidence: str, now: float) -> Adjustment:
        before = self.rung
        self._base = new
        self._last_base_move = now
        return self._adjustment(reason, before, evidence)

    def _latency_limit(self, counts: list[np.ndarray], size: int) -> tuple[int, Interval | None]:
        """The most aggressive rung latency may push to: the ceiling, or the rung before the first (from the
        base up) whose agreement is shown below the floor; and that evidence."""
        floor = self.targets.floor
        for rung in range(self._base + 1, self.ceiling_rung + 1):
            below = self._below(counts, size, rung, floor) if floor is not None else None
            if below is not None:
                return rung - 1, below
        return self.ceiling_rung, None

    def _steer_latency(
        self,
        counts: list[np.ndarray],
        size: int,
        recent: list[float],
        window: list[float],
        queue_wait_s: float,
        now: float,
    ) -> list[Adjustment]:
        """Push on the p99 since the last move (or the queue wait); come back only once the whole latency window
        is calm, so a push that has just emptied the queue is not undone while the load lasts."""
        target = self.targets.p99_s
        assert target is not None
        self.p99_s = float(np.quantile(recent, 0.99)) if len(recent) >= MIN_LATENCY_SAMPLES else None
        limit, floor_evidence = self._latency_limit(counts, size)
        current = self.rung
        if current > limit and self._push > 0:
            # The floor moved under the push (new evidence): step back to it at once.
            assert floor_evidence is not None
            self._push = max(0, limit - self._base)
            evidence = f"agreement at {self.ladder[limit + 1]:.4f}: {floor_evidence.describe()} < floor"
            return [self._push_moved(Reason.FLOOR, current, evidence, now)]
        waiting = queue_wait_s > target * QUEUE_SHARE
        slow = self.p99_s is not None and self.p99_s > target
        if waiting or slow:
            if current >= limit:
                return []
            self._push = min(current + self._push_step, limit) - self._base
            self._push_step *= 2
            self._pushed = (now, self._request_rate(window, now))
            if self._stepped_back_at is not None and now - self._stepped_back_at < self.latency_memory_s:
                self._broke = (current, now)  # a step back walked into this: remember where
                self._stepped_back_at = None
                # ...and under the same load, probe less often: 30, 60, 120, 240 s (exponential backoff).
                self._stabilize_s = min(2 * self._stabilize_s, MAX_BACKOFF * self.latency_memory_s)
            if slow:
                evidence = f"p99 {self.p99_s * 1000:.1f} ms over {len(recent)} requests > target {target * 1000:g} ms"  # type: ignore[operator]
            else:
                evidence = f"queue wait {queue_wait_s * 1000:.1f} ms > {QUEUE_SHARE:g} x target {target * 1000:g} ms"
            return [self._push_moved(Reason.LATENCY_HIGH, current, evidence, now)]
        if self.p99_s is not None:
            self._push_step = 1  # the requests since the last move met the target: the next push starts small
        settled = float(np.quantile(window, 0.99)) if len(window) >= MIN_LATENCY_SAMPLES else None
        calm = (settled is None or settled < target * LOW_WATER) and queue_wait_s < target * QUEUE_SHARE / 2
        remembered = self._broke is not None and now - self._broke[1] < self.latency_memory_s
        if remembered and current - 1 <= self._broke[0]:  # type: ignore[index]
            return []  # the rung below broke the target not long ago: stay above it
        stabilizing = self._pushed is not None and now - self._pushed[0] < self._stabilize_s
        if stabilizing and self._request_rate(window, now) > self._pushed[1] * RATE_FALLEN:  # type: ignore[index]
            return []  # the load that needed the push is still here: keep the capacity it bought
        if calm and self._push > 0 and now - self._last_push_move >= self.recover_s:
            self._stepped_back_at = now
            self._push -= 1
            if stabilizing or self._push == 0:  # the load fell, or it is all the way back: probe at 30 s again
                self._stabilize_s = self.latency_memory_s
            p99 = "no requests" if settled is None else f"p99 {settled * 1000:.1f} ms over the last {len(window)}"
            evidence = f"{p99} < {LOW_WATER:g} x target {target * 1000:g} ms"
            return [self._push_moved(Reason.LATENCY_RECOVERED, current, evidence, now)]
        return []

    def _request_rate(self, window: list[float], now: float) -> float:
        """Requests per second over the latency window (over the time since start while that is shorter)."""
        span = min(self.latency_window_s, now - self._started)
        return len(window) / span if span > 0 else 0.0

    def _push_moved(self, reason: Reason, before: int, evidence: str, now: float) -> Adjustment:
        self._last_push_move = now
        return self._adjustment(reason, before, evidence)

    def _adjustment(self, reason: Reason, before: int, evidence: str) -> Adjustment:
        after = self.rung
        return Adjustment(reason, before, after, self.ladder[before], self.ladder[after], evidence)

    # --- resuming (DEEBERT_CONTROLLER_STATE) --------------------------------------------------------

    def state(self, model: str, criterion: str) -> dict[str, Any]:
        """What a restarted server needs to resume: the rungs, the latency push and the evidence window."""
        with self._lock:
            agrees = [row.tolist() for row in self._evidence.agrees]
            layers = [row.tolist() for row in self._evidence.exit_layers]
        return {
            "version": STATE_VERSION,
            "model": model,
            "criterion": criterion,
            "ladder": self.ladder,
            "threshold": self.ladder[self._base],
            "latency_rungs": self._push,
            "evidence": {"agrees": agrees, "exit_layers": layers},
            "saved_at": time.time(),
        }

    def save(self, path: Path, model: str, criterion: str) -> None:
        """Write the state atomically (a crash mid-write leaves the previous file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.state(model, criterion)))
        os.replace(partial, path)

    def resume(self, path: Path, model: str, criterion: str) -> bool:
        """Take up a saved state if it is for this model and criterion; a missing, unreadable or foreign file
        is ignored with a warning (never a failed start). True when resumed."""
        if not path.exists():
            logger.info("controller state %s does not exist yet; starting at the configured default", path)
            return False
        try:
            saved = json.loads(path.read_text())
            if saved.get("version") != STATE_VERSION:
                raise ValueError(f"state version {saved.get('version')}, expected {STATE_VERSION}")
            if saved["model"] != model or saved["criterion"] != criterion:
                raise ValueError(f"it is for {saved['model']} ({saved['criterion']}), not {model} ({criterion})")
            threshold = float(saved["threshold"])
            same_ladder = [round(v, 9) for v in saved["ladder"]] == [round(v, 9) for v in self.ladder]
            evidence = saved["evidence"] if same_ladder else {"agrees": [], "exit_layers": []}
            rows = [
                LadderEvidence(tuple(bool(a) for a in agrees), tuple(int(x) for x in layers))
                for agrees, layers in zip(evidence["agrees"], evidence["exit_layers"], strict=True)
            ]
            push = int(saved.get("latency_rungs", 0)) if self.targets.p99_s is not None else 0
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("controller state %s ignored: %s", path, err)
            return False
        before = self.rung
        with self._lock:
            for row in rows:
                self._evidence.add(row)
            self._received, self._low_at = len(rows), 0
        self._base = min(range(len(self.ladder)), key=lambda r: abs(self.ladder[r] - threshold))
        self._push = max(0, push)
        if not same_ladder:
            logger.warning("controller state %s: the ladder changed; its threshold kept, its evidence dropped", path)
        move = self._adjustment(Reason.RESUMED, before, f"{len(rows)} samples from {path}")
        logger.info("controller resumed at threshold %.4f (%s)", self.threshold, move.evidence)
        if move.from_rung != move.to_rung:
            self.adjustments.append(move)
            self._on_change(move)
        return True
