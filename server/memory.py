"""Keeping the server's resident memory flat: the memory allocator, a kernel cache, and freed memory.

glibc's malloc keeps freed memory in its arenas and fragments under a server's churn (request bodies,
tokenizer output, activations of batches of every shape): in a 10-minute soak at 70 % of capacity resident
memory crept from 900 to 1043 MiB although nothing leaked (tracemalloc over thousands of requests shows no
growth of live Python objects, and one `malloc_trim` brought it back to 558 MiB). jemalloc, with its
background thread returning pages a second after they fall free, held the same soak flat. So `deebert
serve` runs on jemalloc when the system has it (`DEEBERT_ALLOCATOR=auto`, the default; the Docker image
installs it): the allocator must be in place before the process allocates anything, so the command re-runs
itself once with `LD_PRELOAD` set. With glibc (no jemalloc installed, or `DEEBERT_ALLOCATOR=system`) the
server caps glibc's arenas and calls `malloc_trim(0)`: at once when it goes idle, and now and then between
two batches while it stays busy. On either allocator, what stayed after a burst of every batch shape was
oneDNN's cache of kernels compiled per input shape, which the server caps (`bound_kernel_cache`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

logger = logging.getLogger("deebert.server")


class WorkCounter(Protocol):
    @property
    def busy(self) -> bool: ...

    batches_taken: int

    async def run_in_worker(self, function: Callable[[], object]) -> None: ...


M_ARENA_MAX = -8  # glibc's mallopt parameter number

# Library names to look for, most specific first (ctypes.util.find_library strips "lib" and ".so").
ALLOCATOR_LIBRARIES: dict[str, tuple[str, ...]] = {
    "jemalloc": ("jemalloc",),
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
}
INSTALL_HINT = {"jemalloc": "apt install libjemalloc2", "tcmalloc": "apt install libgoogle-perftools4"}
# Unused pages go back to the system a second after they fall free, from jemalloc's own background thread
# (its defaults keep them 10 s; throughput-tuned settings elsewhere keep them forever), and they go back for
# good (muzzy_decay_ms:0 skips the lazy MADV_FREE stage, whose pages go on counting in RSS until the kernel
# is short of memory). oversize_threshold:0 keeps a batch's large activations (>= 8 MiB) in the ordinary
# arenas: in jemalloc's default oversize arena they were returned at once and faulted in again on the next
# batch, and a full batch took 213-218 ms against 194 ms on glibc (196-203 ms with this setting).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0"
# Set in the environment of the re-run process: the preload was tried, so it is not tried twice.
PRELOAD_MARK = "DEEBERT_ALLOCATOR_PRELOADED"


# oneDNN (torch's CPU kernels for GELU here) JIT-compiles and caches a kernel per input shape, up to 1024
# by default: under load every (batch size, length) pair adds one, ~30 MiB in all, which never comes back.
# 256 kept the memory bounded at a few MiB with no measurable slowdown, batched or at batch 1.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 256


def bound_kernel_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> str:
    """Cap oneDNN's per-shape kernel cache (unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set already); before the
    first forward pass, when oneDNN reads it. Returns the capacity in effect."""
    return os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))


class AllocatorError(Exception):
    """The allocator asked for cannot be used (not installed, or preloading it failed)."""


def loaded_allocator(maps: Path | None = None) -> str:
    """Which malloc a process runs on (default: this one): "jemalloc" or "tcmalloc" when one is mapped, else
    "system". A process cannot change its allocator once started, so this process's answer is read once."""
    return _this_process_allocator() if maps is None else _allocator_in(maps)


@functools.cache
def _this_process_allocator() -> str:
    return _allocator_in(Path("/proc/self/maps"))


def _allocator_in(maps: Path) -> str:
    try:
        mapped = maps.read_text()
    except OSError:
        return "system"
    for name in ALLOCATOR_LIBRARIES:
        if f"lib{name}" in mapped:
            return name
    return "system"


# Where distributions put shared libraries, for systems whose linker cache `find_library` cannot read.
LIBRARY_DIRECTORIES = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_allocator_library(name: str) -> str | None:
    """The shared library of allocator `name` on this system (e.g. "libjemalloc.so.2"), or None."""
    for library in ALLOCATOR_LIBRARIES[name]:
        found = ctypes.util.find_library(library)
        if found:
            return found
    for directory in LIBRARY_DIRECTORIES:
        for library in ALLOCATOR_LIBRARIES[name]:
            candidates = sorted(Path(directory).glob(f"lib{library}.so.*"))
            if candidates:
                return str(candidates[0])
    return None


@dataclass
class AllocatorPlan:
    """What `deebert serve` does about its allocator: run as it is, or re-run itself with `environment` added."""

    allocator: str
    environment: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def needs_reexec(self) -> bool:
        return bool(self.environment)


def plan_allocator(
    requested: str,
    environ: Mapping[str, str],
    loaded: Callable[[], str] = loaded_allocator,
    find: Callable[[str], str | None] = find_allocator_library,
) -> AllocatorPlan:
    """Decide how to get the `requested` allocator (auto: jemalloc when installed, else glibc)."""
    current = loaded()
    if requested == "system" or (requested == "auto" and current != "system"):
        return AllocatorPlan(current)  # what runs already (an LD_PRELOAD set by the user is respected)
    wanted = "jemalloc" if requested == "auto" else requested
    if current == wanted:
        return AllocatorPlan(current)
    library = find(wanted)
    tried = environ.get(PRELOAD_MARK)
    if library is None or tried:
        if tried:
            reason = f"preloading {tried} did not take effect"
        else:
            reason = f"lib{wanted} is not installed ({INSTALL_HINT[wanted]})"
        if requested == "auto":
            return AllocatorPlan("system", note=f"{reason}; using the system allocator with periodic trimming")
        raise AllocatorError(f"DEEBERT_ALLOCATOR={requested}: {reason}")
    preload = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    environment = {"LD_PRELOAD": preload, PRELOAD_MARK: library}
    if wanted == "jemalloc" and "MALLOC_CONF" not in environ:
        environment["MALLOC_CONF"] = JEMALLOC_CONF
    return AllocatorPlan(wanted, environment)


def reexec(environment: Mapping[str, str]) -> NoReturn:
    """Replace this process by the same command line with `environment` added (same PID, so supervisors,
    signals and RSS readers keep following it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **environment})


def _libc(function_name: str) -> Any | None:
    """A function of the C library, or None where there is none (not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), function_name)
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas (`mallopt(M_ARENA_MAX, count)`), before the server starts its threads.

    glibc gives busy threads arenas of their own, up to 8 per core, and each keeps the memory it freed.
    Capping them is the usual first remedy for resident memory that creeps up under load; on its own it did
    not stop the creep in RELIABILITY.md's soaks (trimming, below, does). True when applied.
    """
    mallopt = _libc("mallopt") if count > 0 else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` as a function, or None where the C library has none."""
    function = _libc("malloc_trim")
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: int(function(0))


async def release_freed_memory(batcher: WorkCounter, interval_s: float, busy_every: int = 6) -> None:
    """Every `interval_s`, if batches ran since the last trim: trim at once when nothing is queued or running;
    under sustained load, every `busy_every` intervals, on the batch thread between two batches (a pause of
    milliseconds), so resident memory stays flat through a long busy spell too."""
    trim = malloc_trim()
    if trim is None or interval_s <= 0 or loaded_allocator() != "system":
        return  # jemalloc and tcmalloc return free pages themselves
    trimmed_at = batcher.batches_taken
    waited = 0
    while True:
        await asyncio.sleep(interval_s)
        waited += 1
        if batcher.batches_taken == trimmed_at:
            continue
        if not batcher.busy:
            await asyncio.to_thread(trim)
        elif waited >= busy_every:
            await batcher.run_in_worker(trim)
        else:
            continue
        trimmed_at, waited = batcher.batches_taken, 0
        logger.debug("released freed heap memory to the system")
