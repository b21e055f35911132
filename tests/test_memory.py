"""Flat resident memory: choosing the allocator (jemalloc when installed), and glibc's trims, which run only
after work happened and only while nothing is queued or running (or between batches in a long busy spell)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


@pytest.mark.anyio
async def test_trims_once_per_burst_and_between_batches_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    monkeypatch.setattr(memory, "loaded_allocator", lambda: "system")
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


@pytest.mark.anyio
async def test_no_glibc_trims_on_jemalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    monkeypatch.setattr(memory, "loaded_allocator", lambda: "jemalloc")
    batcher = FakeBatcher(batches_taken=5)
    await asyncio.wait_for(memory.release_freed_memory(batcher, 0.01), 1.0)  # returns at once
    assert calls == []


def test_loaded_allocator_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert memory.loaded_allocator(maps) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert memory.loaded_allocator(maps) == "jemalloc"
    assert memory.loaded_allocator(tmp_path / "missing") == "system"
    assert memory.loaded_allocator() in {"system", "jemalloc", "tcmalloc"}  # this very process


def _plan(
    requested: str, environ: dict[str, str], loaded: str = "system", installed: bool = True
) -> memory.AllocatorPlan:
    libraries = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
    return memory.plan_allocator(
        requested, environ, loaded=lambda: loaded, find=lambda name: libraries[name] if installed else None
    )


def test_auto_preloads_jemalloc_once_and_falls_back_to_glibc() -> None:
    plan = _plan("auto", {"LD_PRELOAD": "libfoo.so"})
    assert plan.allocator == "jemalloc" and plan.needs_reexec
    assert plan.environment == {
        "LD_PRELOAD": "libjemalloc.so.2:libfoo.so",  # a user's own preload is kept
        "MALLOC_CONF": memory.JEMALLOC_CONF,
        memory.PRELOAD_MARK: "libjemalloc.so.2",
    }
    assert _plan("auto", {"MALLOC_CONF": "narenas:2"}).environment.get("MALLOC_CONF") is None  # theirs wins
    # Re-run with the preload in place: nothing more to do.
    assert not _plan("auto", plan.environment, loaded="jemalloc").needs_reexec
    # The preload was tried and did not take: glibc, said out loud, and no second re-run (no loop).
    failed = _plan("auto", plan.environment, loaded="system")
    assert (failed.allocator, failed.needs_reexec) == ("system", False) and "did not take effect" in failed.note
    missing = _plan("auto", {}, installed=False)
    assert (missing.allocator, missing.needs_reexec) == ("system", False)
    assert "apt install libjemalloc2" in missing.note
    # A process already running on another allocator (a user's LD_PRELOAD) is left as it is.
    assert _plan("auto", {}, loaded="tcmalloc").allocator == "tcmalloc"


def test_explicit_allocators() -> None:
    assert (_plan("system", {}).allocator, _plan("system", {}).needs_reexec) == ("system", False)
    tcmalloc = _plan("tcmalloc", {})
    assert tcmalloc.environment == {
        "LD_PRELOAD": "libtcmalloc_minimal.so.4",
        memory.PRELOAD_MARK: tcmalloc.environment[memory.PRELOAD_MARK],
    }
    with pytest.raises(memory.AllocatorError, match="apt install libjemalloc2"):
        _plan("jemalloc", {}, installed=False)
    with pytest.raises(memory.AllocatorError, match="did not take effect"):
        _plan("jemalloc", {memory.PRELOAD_MARK: "libjemalloc.so.2"})


def test_kernel_cache_is_capped_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory.ONEDNN_CACHE_ENV, raising=False)
    assert memory.bound_kernel_cache() == "256"
    assert memory.bound_kernel_cache(64) == "256"  # set once; a user's own value is never overridden
    monkeypatch.setenv(memory.ONEDNN_CACHE_ENV, "32")
    assert memory.bound_kernel_cache() == "32"


def test_allocator_library_found_without_the_linker_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)  # no ldconfig, no compiler
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setattr(memory, "LIBRARY_DIRECTORIES", (str(tmp_path / "missing"), str(tmp_path)))
    assert memory.find_allocator_library("jemalloc") == str(tmp_path / "libjemalloc.so.2")
    assert memory.find_allocator_library("tcmalloc") is None


OPENVINO_UNDER_JEMALLOC = """
import numpy as np, openvino
from openvino import opset13 as ops
from model.openvino_backend import openvino_unavailable_reason
assert openvino_unavailable_reason() is None, openvino_unavailable_reason()
x = ops.parameter([2, 4], np.float32, name="x")
compiled = openvino.Core().compile_model(openvino.Model([ops.relu(x)], [x], "relu"), "CPU")
print(compiled(np.full((2, 4), -1.0, np.float32))[0].sum())
"""


def test_openvino_compiles_and_runs_under_a_preloaded_jemalloc() -> None:
    """OpenVINO's oneTBB opens hwloc with RTLD_DEEPBIND, which made its first compile abort under a preloaded
    jemalloc (glibc's free on jemalloc's memory); the backend's check sets TBB_ENABLE_SANITIZERS=1 first, which
    drops that flag. A real process with jemalloc preloaded, as `deebert serve` runs by default."""
    import os
    import subprocess
    import sys

    pytest.importorskip("openvino")
    library = memory.find_allocator_library("jemalloc")
    if library is None:
        pytest.skip("jemalloc is not installed (apt-get install libjemalloc2)")
    environment = {k: v for k, v in os.environ.items() if k != "TBB_ENABLE_SANITIZERS"}
    done = subprocess.run(
        [sys.executable, "-c", OPENVINO_UNDER_JEMALLOC],
        env={**environment, "LD_PRELOAD": library, "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0.0"


def test_openvino_is_refused_under_a_preloaded_allocator_when_told_to_keep_deepbind(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A user who sets TBB_ENABLE_SANITIZERS to something else keeps oneTBB's RTLD_DEEPBIND: refused, saying why."""
    pytest.importorskip("openvino")
    from model.openvino_backend import openvino_unavailable_reason

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")  # read, not loaded
    monkeypatch.setenv("TBB_ENABLE_SANITIZERS", "0")
    reason = openvino_unavailable_reason()
    assert reason is not None and "jemalloc" in reason and "TBB_ENABLE_SANITIZERS=0" in reason
