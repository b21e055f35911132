"""Brownout: under overload, answer requests that set no threshold at a cheaper one instead of queueing longer.

While texts wait in the queue longer than the target, a request that did not pin a threshold (no body
`threshold`, no `X-Exit-Threshold` header) gets the ceiling threshold (e.g. the `fast` preset) in place of
the server default, and its response says so with `X-Exit-Degraded: true`. Brownout ends when the queue
drains (nothing queued or running), so an idle server always answers at full quality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

ThresholdT = TypeVar("ThresholdT")


class Brownout(Generic[ThresholdT]):
    """The brownout state machine: on above the queue-wait target, off once drained."""

    def __init__(
        self, target_wait_s: float, ceiling: ThresholdT, on_change: Callable[[bool], None] | None = None
    ) -> None:
        self.target_wait_s = target_wait_s
        self.ceiling = ceiling
        self.active = False
        self._on_change = on_change or (lambda active: None)

    def update(self, queue_wait_s: float, drained: bool) -> bool:
        """Enter when the queue wait exceeds the target, leave when the queue has drained; the new state."""
        active = False if drained else (self.active or queue_wait_s > self.target_wait_s)
        if active != self.active:
            self.active = active
            self._on_change(active)
        return active

    def threshold_for(self, pinned: bool, queue_wait_s: float, drained: bool) -> ThresholdT | None:
        """The ceiling for a request that did not pin a threshold while brownout is on; else None."""
        active = self.update(queue_wait_s, drained)
        return self.ceiling if active and not pinned else None
