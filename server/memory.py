"""Giving memory back to the system after a burst.

glibc keeps freed heap memory in its per-thread arenas: after a burst of thousands of concurrent requests
(request bodies, tokenizer output, activations of large batches), the server's resident memory stays at the
burst's peak although the memory is free. Once the server is idle again, `malloc_trim(0)` returns those
pages; nothing is trimmed while requests are being served, and nothing happens on non-glibc systems.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("deebert.server")


class WorkCounter(Protocol):
    @property
    def busy(self) -> bool: ...

    batches_taken: int


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` as a function, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: int(function(0))


async def release_memory_when_idle(batcher: WorkCounter, interval_s: float) -> None:
    """Every `interval_s`, if batches ran since the last trim and none is queued or running now, trim."""
    trim = malloc_trim()
    if trim is None or interval_s <= 0:
        return
    trimmed_at = batcher.batches_taken
    while True:
        await asyncio.sleep(interval_s)
        if batcher.busy or batcher.batches_taken == trimmed_at:
            continue
        trimmed_at = batcher.batches_taken
        released = await asyncio.to_thread(trim)
        logger.debug("idle: malloc_trim released memory: %s", bool(released))
