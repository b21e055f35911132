"""The latency policy: how many rungs beyond the agreement's rung (the "push") the p99 target asks for, as an
explicit state machine. Fast up, slow down, with a stabilization window and a backoff, like the `behavior`
rules of Kubernetes' HorizontalPodAutoscaler.

States: STEADY (no push), PUSHED (pushed by an overload), RECOVERING (stepping back). Transitions, each tick:

- PUSHED/RECOVERING -> same (STEADY at 0), the agreement floor is shown below the pushed rung: the push is cut
  to the floor.
- any -> PUSHED, overload (p99 over the target, or the queue wait over half of it) short of the floor's limit:
  push += step, and the step doubles (1, 2, 4, ...). From RECOVERING/STEADY within `memory_s` of a step back,
  also: that rung is remembered as broken, and the stabilization window doubles.
- PUSHED/RECOVERING -> RECOVERING (STEADY at 0), calm (the window's p99 under half the target, a short queue),
  `recover_s` since the last move, the load that needed the push gone or the stabilization window over, and
  the rung below not remembered as broken: push -= 1.
- any -> same, a tick that met the target: the step is 1 again.

The stabilization window (`memory_s` after a push, doubled by each break up to `MAX_BACKOFF` times) holds the
push while the request rate stays above `RATE_FALLEN` of the rate at the push: a calm window under the same
load says the push worked, not that it is no longer needed. A fallen rate, or a return all the way to the
base, resets it. docs/controller.md tells the runs that shaped these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from server.controller.targets import Reason

# Overloaded while the queue wait exceeds this share of the target; calm once it is under half of it.
QUEUE_SHARE = 0.5
# Calm once the whole window's p99 is under this share of the target.
LOW_WATER = 0.5
# A p99 needs at least this many requests.
MIN_LATENCY_SAMPLES = 20
# Within the stabilization window, step back only once the request rate is below this share of the rate at the push.
RATE_FALLEN = 0.8
# Each break under the same load doubles the stabilization window, up to this many times `memory_s`.
MAX_BACKOFF = 8


class LatencyState(StrEnum):
    STEADY = "steady"  # no push: the default is the agreement's rung
    PUSHED = "pushed"  # pushed by an overload; holding while the load that needed it lasts
    RECOVERING = "recovering"  # calm: stepping back one rung per `recover_s`


@dataclass(frozen=True)
class LatencyReading:
    """What the latency policy sees at one tick."""

    p99_s: float | None  # over the requests since the last move (None: fewer than MIN_LATENCY_SAMPLES)
    requests: int  # requests since the last move
    window_p99_s: float | None  # over the whole latency window, moves or not
    window_requests: int
    queue_wait_s: float
    request_rate: float  # requests per second over the latency window


@dataclass(frozen=True)
class PushMove:
    """The latency policy changing its push."""

    push: int
    reason: Reason
    evidence: str


class LatencyPolicy:
    """Holds the `target_s` p99 by pushing the default past the agreement's rung (see the module's table)."""

    def __init__(self, target_s: float, ceiling: int, *, recover_s: float, memory_s: float, now: float) -> None:
        self.target_s = target_s
        self.ceiling = ceiling
        self.recover_s = recover_s
        self.memory_s = memory_s
        self.state = LatencyState.STEADY
        self.push = 0  # rungs beyond the base
        self._step = 1  # rungs the next push moves
        self._last_move = now
        self._pushed_at: float | None = None
        self._rate_at_push = 0.0
        self._stepped_back_at: float | None = None  # the last step back, until the next push
        self._broken: tuple[int, float] | None = None  # the rung a step back broke the target at, and when
        self._stabilize_s = memory_s

    def resume(self, push: int) -> None:
        self.push = max(0, push)
        self.state = LatencyState.PUSHED if self.push else LatencyState.STEADY

    def decide(
        self, reading: LatencyReading, *, base: int, limit: int, floor_evidence: str | None, now: float
    ) -> PushMove | None:
        """One tick. `base`: the agreement's rung; `limit`: the furthest rung the agreement floor allows, with
        `floor_evidence` saying why when it is short of the ceiling."""
        current = min(base + self.push, self.ceiling)
        if current > limit and self.push > 0:
            return self._cut_to_floor(base, limit, floor_evidence or "", now)
        target = self.target_s
        waiting = reading.queue_wait_s > target * QUEUE_SHARE
        slow = reading.p99_s is not None and reading.p99_s > target
        if waiting or slow:
            if current >= limit:
                return None
            return self._push(current, base, limit, reading, slow, now)
        if reading.p99_s is not None:
            self._step = 1  # the requests since the last move met the target: the next push starts small
        return self._maybe_step_back(current, reading, now)

    def _cut_to_floor(self, base: int, limit: int, floor_evidence: str, now: float) -> PushMove:
        self.push = max(0, limit - base)
        if self.push == 0:
            self.state = LatencyState.STEADY
        return self._moved(Reason.FLOOR, floor_evidence, now)

    def _push(self, current: int, base: int, limit: int, reading: LatencyReading, slow: bool, now: float) -> PushMove:
        self.push = min(current + self._step, limit) - base
        self._step *= 2
        if self._stepped_back_at is not None and now - self._stepped_back_at < self.memory_s:
            self._broken = (current, now)  # a step back walked into this: remember where
            # ...and under the same load, probe less often: 30, 60, 120, 240 s (exponential backoff).
            self._stabilize_s = min(2 * self._stabilize_s, MAX_BACKOFF * self.memory_s)
        self._stepped_back_at = None
        self._pushed_at, self._rate_at_push = now, reading.request_rate
        self.state = LatencyState.PUSHED
        milliseconds = self.target_s * 1000
        if slow and reading.p99_s is not None:
            p99 = reading.p99_s * 1000
            evidence = f"p99 {p99:.1f} ms over {reading.requests} requests > target {milliseconds:g} ms"
        else:
            evidence = f"queue wait {reading.queue_wait_s * 1000:.1f} ms > {QUEUE_SHARE:g} x target {milliseconds:g} ms"
        return self._moved(Reason.LATENCY_HIGH, evidence, now)

    def _maybe_step_back(self, current: int, reading: LatencyReading, now: float) -> PushMove | None:
        if self._broken is not None and now - self._broken[1] < self.memory_s and current - 1 <= self._broken[0]:
            return None  # the rung below broke the target not long ago: stay above it
        stabilizing = self._pushed_at is not None and now - self._pushed_at < self._stabilize_s
        if stabilizing and reading.request_rate > self._rate_at_push * RATE_FALLEN:
            return None  # the load that needed the push is still here: keep the capacity it bought
        settled = reading.window_p99_s
        calm = (settled is None or settled < self.target_s * LOW_WATER) and reading.queue_wait_s < (
            self.target_s * QUEUE_SHARE / 2
        )
        if not calm or self.push == 0 or now - self._last_move < self.recover_s:
            return None
        self._stepped_back_at = now
        self.push -= 1
        self.state = LatencyState.RECOVERING if self.push else LatencyState.STEADY
        if stabilizing or self.push == 0:  # the load fell, or it is all the way back: probe at `memory_s` again
            self._stabilize_s = self.memory_s
        seen = "no requests"
        if settled is not None:
            seen = f"p99 {settled * 1000:.1f} ms over the last {reading.window_requests}"
        evidence = f"{seen} < {LOW_WATER:g} x target {self.target_s * 1000:g} ms"
        return self._moved(Reason.LATENCY_RECOVERED, evidence, now)

    def _moved(self, reason: Reason, evidence: str, now: float) -> PushMove:
        self._last_move = now
        return PushMove(self.push, reason, evidence)
