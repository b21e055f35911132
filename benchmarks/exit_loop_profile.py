"""Where the PyTorch exit loop's time goes in batches, against one full-depth forward of the same batches:
wall time per call, the accelerator's busy time, kernel launches and host synchronisations per call, and the
operators that take the most time (torch.profiler).

A random-weight model of one of `benchmarks.paper_sizes`' shapes replays the shipped checkpoint's exit layers
(at `balanced`, scaled to the depth), so the loop does the work it does in serving: each layer, its off-ramp,
one exit decision read on the host, and compaction of the rows that left. Accuracy is not measured.

    python -m benchmarks.exit_loop_profile --device cuda --dtype float16 --shape bert-base --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import paper_sizes

# Host-side CUDA runtime calls counted per model call: the launches, and the copies / waits that block the host.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def profile_calls(run: Callable[[], None], calls: int, device: torch.device, top: int) -> dict[str, Any]:
    """`run` `calls` times under torch.profiler (after timing the same calls without it)."""
    from model.device import synchronize

    for _ in range(3):  # warm-up: kernels, allocator, shapes
        run()
    synchronize(device)
    walls = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        run()
        synchronize(device)
        walls.append((time.perf_counter_ns() - started) / 1e6)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        synchronize(device)
    averages = profiler.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    def count(names: Sequence[str]) -> float:
        return sum(event.count for event in averages if event.key in names) / calls

    by_cpu = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    by_device = sorted(averages, key=device_us, reverse=True)[:top]
    return {
        "wall_ms_median": statistics.median(walls),
        "wall_ms": walls,
        # The device's own events (kernels, copies) only: an operator's self device time repeats its kernels'.
        "device_busy_ms_per_call": sum(
            device_us(event) for event in averages if event.device_type == torch.autograd.DeviceType.CUDA
        )
        / calls
        / 1e3
        if device.type == "cuda"
        else None,
        "host_op_ms_per_call": sum(event.self_cpu_time_total for event in averages) / calls / 1e3,
        "kernel_launches_per_call": count(LAUNCH_CALLS) if device.type == "cuda" else None,
        "blocking_calls_per_call": {name: count((name,)) for name in BLOCKING_CALLS} if device.type == "cuda" else None,
        "top_host_ops": [
            {
                "op": e.key,
                "calls_per_call": e.count / calls,
                "self_host_ms_per_call": e.self_cpu_time_total / calls / 1e3,
            }
            for e in by_cpu
        ],
        "top_device_ops": [
            {"op": e.key, "calls_per_call": e.count / calls, "self_device_ms_per_call": device_us(e) / calls / 1e3}
            for e in by_device
            if device_us(e) > 0
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6", help="whose exit layers are replayed")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--shape", default="bert-base", help=f"one of {', '.join(paper_sizes.SHAPES)}")
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float16", help="float32, float16 or bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="length-sorted batches per call set (dev order)")
    parser.add_argument("--calls", type=int, default=10, help="profiled rounds over the batches")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the exit layers' fp32 run)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    from model.device import DTYPES, describe_device, pick_device, prepare
    from model.saving import expected_saving
    from model.tokenization import groups_by_length, pad_batch
    from reports.common import machine_description

    torch.set_num_threads(args.threads)
    encoded, layers, shipped_depth = paper_sizes.shipped_exit_layers(
        args.checkpoint, args.data, None, args.threads, "torch"
    )
    device = pick_device(args.device)
    prepare(device)
    model = paper_sizes.random_deebert(args.shape).to(device=device, dtype=DTYPES[args.dtype]).eval()
    n = model.num_layers
    targets = paper_sizes.replayed_layers(layers, shipped_depth, n)
    groups = groups_by_length(encoded, args.batch_size)[: args.batches]
    batches = [(pad_batch([encoded[i] for i in g], 0).to(device), [float(targets[i]) for i in g]) for g in groups]
    rule = paper_sizes.ReplayCriterion()

    def run_all(exit_early: bool) -> Callable[[], None]:
        def run() -> None:
            for batch, replayed in batches:
                thresholds = replayed if exit_early else [0.0] * len(replayed)
                model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, criterion=rule)

        return run

    replayed_layers = [targets[i] for g in groups for i in g]
    report: dict[str, Any] = {
        "command": "python -m benchmarks.exit_loop_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "device": describe_device(device),
        "dtype": args.dtype,
        "shape": {"name": args.shape, **paper_sizes.SHAPES[args.shape]},
        "batches": [len(g) for g in groups],
        "tokens_per_batch": [int(batch.input_ids.shape[1]) for batch, _ in batches],
        "expected_saving": expected_saving(replayed_layers, n),
        "accuracy": "not measured: random weights replaying the shipped checkpoint's exit layers",
        "full_depth": profile_calls(run_all(False), args.calls, device, args.top),
        "exit_loop": profile_calls(run_all(True), args.calls, device, args.top),
    }
    full, loop = report["full_depth"], report["exit_loop"]
    report["exit_over_full_wall"] = loop["wall_ms_median"] / full["wall_ms_median"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, figures in (("full depth", full), ("exit loop", loop)):
        print(
            f"{name}: {figures['wall_ms_median']:.2f} ms a call set, device busy {figures['device_busy_ms_per_call']}"
            f" ms, {figures['kernel_launches_per_call']} launches, blocking {figures['blocking_calls_per_call']}"
        )
        for op in figures["top_host_ops"][:8]:
            print(f"    host {op['self_host_ms_per_call']:.3f} ms  x{op['calls_per_call']:.0f}  {op['op']}")
        for op in figures["top_device_ops"][:8]:
            print(f"    device {op['self_device_ms_per_call']:.3f} ms  x{op['calls_per_call']:.0f}  {op['op']}")
    ratio, expected = report["exit_over_full_wall"], report["expected_saving"]
    print(f"exit loop / full depth, wall: {ratio:.2f}; expected saving {expected:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
