"""Idle-time memory release: trims only after work happened and only while nothing is queued or running."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from server import memory


@dataclass
class FakeBatcher:
    busy: bool = False
    batches_taken: int = 0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_trims_once_per_burst_and_never_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: (lambda: calls.append(1) or 1))
    batcher = FakeBatcher()
    task = asyncio.create_task(memory.release_memory_when_idle(batcher, 0.01))
    try:
        await asyncio.sleep(0.05)
        assert calls == [], "no work yet: nothing to give back"
        batcher.busy, batcher.batches_taken = True, 3
        await asyncio.sleep(0.05)
        assert calls == [], "never while serving"
        batcher.busy = False
        await asyncio.sleep(0.05)
        assert calls == [1], "once after the burst"
        await asyncio.sleep(0.05)
        assert calls == [1], "not again without new work"
    finally:
        task.cancel()


def test_malloc_trim_is_callable_on_glibc() -> None:
    trim = memory.malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert trim() in (0, 1)
