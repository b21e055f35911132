"""Idle-time memory release: trims only after work happened and only while nothing is queued or running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from server import memory


@dataclass
class FakeBatcher:
    busy: bool = False
    batches_taken: int = 0
    in_worker: int = 0

    async def run_in_worker(self, function: Callable[[], object]) -> None:
        self.in_worker += 1
        function()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_trims_once_per_burst_and_between_batches_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: (lambda: calls.append(1) or 1))
    batcher = FakeBatcher()
    task = asyncio.create_task(memory.release_freed_memory(batcher, 0.01, busy_every=1000))
    try:
        await asyncio.sleep(0.05)
        assert calls == [], "no work yet: nothing to give back"
        batcher.busy, batcher.batches_taken = True, 3
        await asyncio.sleep(0.05)
        assert calls == [], "not while serving before busy_every intervals"
        batcher.busy = False
        await asyncio.sleep(0.05)
        assert calls == [1] and batcher.in_worker == 0, "once after the burst, off the batch thread"
        await asyncio.sleep(0.05)
        assert calls == [1], "not again without new work"
    finally:
        task.cancel()
    busy = FakeBatcher(busy=True, batches_taken=1)
    task = asyncio.create_task(memory.release_freed_memory(busy, 0.01, busy_every=2))
    try:
        for taken in range(2, 12):
            busy.batches_taken = taken
            await asyncio.sleep(0.01)
        assert busy.in_worker >= 2, "a long busy spell is trimmed too, on the batch thread"
    finally:
        task.cancel()


def test_malloc_trim_is_callable_on_glibc() -> None:
    trim = memory.malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert trim() in (0, 1)


def test_malloc_arenas_can_be_capped_on_glibc() -> None:
    if memory.malloc_trim() is None:
        pytest.skip("not glibc")
    assert memory.limit_malloc_arenas(2) is True
    assert memory.limit_malloc_arenas(0) is False  # 0 means: leave glibc's default
