"""The tune `deebert serve --backend auto` runs at first start, again and again: does its choice hold?

    python -m benchmarks.first_start_tune --checkpoint weights/sst2-minilm-l6 --runs 3 --threads 2

Each run is the bounded tune of a server's first start (`model.tune.STARTUP_TIMING`, `--budget-s`, objective
`split`) with an empty tune cache, the exported graphs reused from `--cache-dir` (linked into a scratch cache,
so nothing of the real cache's tunes is read or written). What each run measured alone and in batches, which
two were timed again side by side (the close calls), and what it chose go to the JSON and a table. A choice that
changes from run to run on a quiet machine is a choice decided by noise.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.report import write_json
from model import tune
from model.checkpoint import resolve_directory
from model.onnx_backend import default_cache_dir
from reports.common import describe_machine, machine_description, number
from reports.terminal import table

GRAPH_CACHES = ("onnx", "openvino")


def one_run(directory: Path, graphs: Path, threads: int | None, batch_size: int, budget_s: float) -> dict[str, Any]:
    """One first-start tune in a scratch cache whose graph folders link to `graphs`'."""
    with tempfile.TemporaryDirectory(prefix="deebert-first-start-") as scratch:
        cache = Path(scratch)
        for name in GRAPH_CACHES:
            (graphs / name).mkdir(parents=True, exist_ok=True)
            (cache / name).symlink_to(graphs / name)
        timing = replace(tune.STARTUP_TIMING, batch_size=batch_size)
        result = tune.run_tune(directory, cache, threads, "split", timing, budget_s=budget_s)
    return {
        "choice": result.choice,
        "batched_choice": result.batched_choice,
        "seconds": result.seconds,
        "eligible_batch1_ms": {m.candidate: m.batch1_ms for m in result.measurements if m.eligible},
        "eligible_batched_per_s": {m.candidate: m.batched_per_s for m in result.measurements if m.eligible},
        "retimed": [m.candidate for m in result.measurements if m.batch1_retimed],
        "retimed_batched": [m.candidate for m in result.measurements if getattr(m, "batched_retimed", False)],
        "candidate_seconds": {m.candidate: m.seconds for m in result.measurements},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="the server's max batch size")
    parser.add_argument("--budget-s", type=float, default=120.0, help="as DEEBERT_TUNE_BUDGET_S")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the exported graphs are (reused)")
    parser.add_argument("--output", type=Path, default=None, help="JSON of every run")
    args = parser.parse_args(argv)
    directory = resolve_directory(args.checkpoint)
    graphs = args.cache_dir or default_cache_dir()
    machine = machine_description()
    runs = []
    for number_ in range(1, args.runs + 1):
        run = one_run(directory, graphs, args.threads, args.batch_size, args.budget_s)
        print(f"run {number_}: {tune_line(run)}", flush=True)
        runs.append(run)
    rows = [
        [
            str(i),
            tune_line(run),
            ", ".join(f"{k} {number(v, 2)}" for k, v in run["eligible_batch1_ms"].items()),
            ", ".join(f"{k} {number(v, 0)}" for k, v in run["eligible_batched_per_s"].items()),
        ]
        for i, run in enumerate(runs, 1)
    ]
    print(describe_machine(machine))
    print(table(["run", "choice (retimed: the close calls)", "eligible batch-1 ms", "eligible batched texts/s"], rows))
    if args.output:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        timing = {k: v for k, v in vars(tune.STARTUP_TIMING).items() if k != "clock"}
        report: dict[str, Any] = {"settings": settings, "machine": machine, "timing": timing, "runs": runs}
        report["close_call_texts"] = getattr(tune, "CLOSE_CALL_TEXTS", None)  # None: before it existed
        report["close_call_batched_texts"] = getattr(tune, "CLOSE_CALL_BATCHED_TEXTS", None)
        write_json(report, args.output)


def tune_line(run: dict[str, Any]) -> str:
    served = str(run["choice"])
    if run["batched_choice"]:
        served = f"{served} alone, {run['batched_choice']} in batches"
    calls = [f"alone {' vs '.join(run['retimed'])}"] if run["retimed"] else []
    if run.get("retimed_batched"):  # absent in runs recorded before the close call in batches
        calls.append(f"in batches {' vs '.join(run['retimed_batched'])}")
    retimed = f" (retimed: {'; '.join(calls)})" if calls else ""
    return f"{served}{retimed}, {run['seconds']} s"


if __name__ == "__main__":
    main()
