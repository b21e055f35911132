"""What reports share: the machine a measurement ran on, markdown tables, and the number formatters.

Every timed report (evaluation, benchmarks, reliability runs) records `machine_description()`; the
markdown writers (docs/RESULTS.md, BENCHMARKS.md, RELIABILITY.md) print it with `describe_machine` and
lay out their tables with `markdown_table`; every report writes its numbers with `number` and `percent`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on; load average matters because a busy CPU skews everything."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "onnxruntime", "onnx", "openvino", "fastapi", "uvicorn", "httpx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu or None,
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "python": platform.python_version(),
        "versions": versions,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "accelerators": _accelerators(),
    }


# The instruction-set extensions that decide which kernels a runtime can use (and so which runtime and
# precision is fastest): fp32 FMA width, int8 dot products, bf16 and AMX tiles.
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_flags() -> list[str]:
    """The SIMD flags of SIMD_FLAGS that this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SIMD_FLAGS if flag in present]
    return []


def _accelerators() -> list[str]:
    """The CUDA devices torch sees (none without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    cuda = torch.version.cuda
    return [f"{torch.cuda.get_device_name(i)} (CUDA {cuda})" for i in range(torch.cuda.device_count())]


# /proc/stat's `cpu` line, in its order: the machine's CPU time so far by kind, in clock ticks.
CPU_TIME_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(stat_path: Path = Path("/proc/stat")) -> dict[str, int] | None:
    """The whole machine's CPU time so far by kind (`CPU_TIME_KINDS`, Linux clock ticks); None where the
    kernel does not report it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in stat_path.read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "cpu":
                values = [int(v) for v in fields[1 : 1 + len(CPU_TIME_KINDS)]]
                if len(values) == len(CPU_TIME_KINDS):
                    return dict(zip(CPU_TIME_KINDS, values, strict=True))
    return None


def stolen_share(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Of the CPU time that passed between two `cpu_times()` readings, the share the hypervisor gave to other
    guests (steal time): on a shared VM, the neighbours that slow every measurement taken in between, and the
    reason two runs of the same command can differ. None when either reading is missing or no time passed."""
    if before is None or after is None:
        return None
    total = sum(after[kind] - before[kind] for kind in CPU_TIME_KINDS)
    if total <= 0:
        return None
    return (after["steal"] - before["steal"]) / total


def describe_machine(machine: dict[str, Any]) -> str:
    """One line for a `machine_description()`: CPU, cores, memory, platform, versions, load at the start."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)
    load = machine.get("load_average")
    load_text = f"; load average at start {', '.join(f'{x:.2f}' for x in load)}" if load else ""
    accelerators = machine.get("accelerators")
    gpu_text = f", {' + '.join(accelerators)}" if accelerators else ""
    flags = machine.get("cpu_flags")
    flags_text = f" [SIMD: {' '.join(flags)}]" if flags else ""
    return (
        f"{machine.get('cpu')}{flags_text} ({machine.get('cpus_usable')} usable of {machine.get('cpu_count')} CPUs)"
        f"{gpu_text}, "
        f"{machine.get('memory_gib')} GiB, {machine.get('platform')}; Python {machine.get('python')}, "
        f"{versions}{load_text}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def percent(value: float | None, digits: int = 1, signed: bool = False, unit: str = "%", missing: str = "-") -> str:
    """A share (0.123) as a percentage (`12.3%`; `+12.3%` signed; `missing` for None): the one formatter of
    every report."""
    if value is None:
        return missing
    return f"{100 * value:{'+' if signed else ''}.{digits}f}{unit}"


def number(value: float | None, digits: int = 2, unit: str = "", missing: str = "-") -> str:
    """A number with `digits` decimals and its unit (`12.35 ms`; `missing` for None): with `percent`, the one
    number formatter of every report."""
    if value is None:
        return missing
    return f"{value:.{digits}f}{unit}"
