"""A lone text's engine time outside the runtime's own calls: `Engine.run_batch` on one tokenized text, right
after another text's `run_batch` (as the server runs a lone request after the last one), with every call of the
runtime's graphs timed and taken out. What remains is the padding, the hand-over to the runtime, reading the
logits, the exit rule and the answer, all with the CPU's caches as the model's call left them.

    python -m benchmarks.lone_row_glue --checkpoint weights/sst2-minilm-l6 --thresholds 0,balanced
    python -m benchmarks.lone_row_glue --source /tmp/before ...   # the engine of another source tree

ONNX Runtime and OpenVINO backends (their graphs' `run` is what is timed).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm


def measure(
    checkpoint: str, backend: str, data: str, texts: int, thresholds: Sequence[str], rounds: int
) -> dict[str, Any]:
    """Per threshold: p50 µs of a lone text's `run_batch` outside the runtime's calls, and of the whole call."""
    from model.data import read_dataset
    from server.engine import Engine
    from server.settings import ServerSettings

    engine = Engine.load(ServerSettings(checkpoint=checkpoint, backend=backend, threads=2, warmup=False))
    items = [engine.tokenize([text], None, truncate=True)[0] for text in read_dataset(data).texts[:texts]]
    steps: Any = engine.model.exit_steps()  # a StepGraphModel: its graphs' `run` is timed
    in_runtime = [0]
    graphs = [steps.plain, *steps.layers, *(g for g in steps.packed_layers if g is not None)]
    if steps.exit_graph is not None:
        graphs.append(steps.exit_graph)
    for graph in graphs:

        def timed(feeds: Any, run: Any = graph.run) -> Any:
            started = time.perf_counter_ns()
            outputs = run(feeds)
            in_runtime[0] += time.perf_counter_ns() - started
            return outputs

        graph.run = timed
    results: dict[str, Any] = {}
    for name in thresholds:
        threshold, _ = engine.model.config.resolve_threshold(name)  # a number or a preset, as the server reads it
        outside, whole, layers = [], [], []
        for _ in tqdm(range(rounds), desc=f"threshold {name}", file=sys.stderr):
            for position, item in enumerate(items):
                engine.run_batch([items[(position + 7) % len(items)]], [threshold], lambda row, outcome: None)
                in_runtime[0] = 0
                answers: list[Any] = []
                started = time.perf_counter_ns()
                engine.run_batch([item], [threshold], functools.partial(_keep, answers))
                elapsed = time.perf_counter_ns() - started
                outside.append((elapsed - in_runtime[0]) / 1e3)
                whole.append(elapsed / 1e3)
                layers.append(answers[0].exit_layer)
        results[name] = {
            "threshold": threshold,
            "outside_runtime_p50_us": statistics.median(outside),
            "run_batch_p50_us": statistics.median(whole),
            "mean_exit_layer": statistics.fmean(layers),
            "texts": len(outside),
        }
    return {"backend": engine.model.backend, "precision": engine.model.precision, "thresholds": results}


def _keep(answers: list[Any], row: int, outcome: Any) -> None:
    answers.append(outcome)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--backend", default="onnxruntime", help="onnxruntime or openvino")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--thresholds", default="0,balanced", help="numbers or preset names, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", type=Path, help="measure the engine of this source tree (default: this one)")
    parser.add_argument("--output", type=Path, help="JSON with the figures, the machine and the command")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.lone_row_glue " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.source is not None:  # this script by its path, with the other tree's packages first
        child = [sys.executable, str(Path(__file__).resolve())]
        child += list(sys.argv[1:] if argv is None else argv)
        at = child.index("--source")
        del child[at : at + 2]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.source.resolve()), str(Path.cwd())]))
        return subprocess.run(child, env=env, check=False).returncode
    from loadtest.report import write_json
    from reports.common import describe_machine, machine_description

    measured = measure(
        str(Path(args.checkpoint).resolve()),
        args.backend,
        args.data,
        args.texts,
        args.thresholds.split(","),
        args.rounds,
    )
    machine = machine_description()
    print(describe_machine(machine))
    for name, row in measured["thresholds"].items():
        print(
            f"threshold {name} ({row['threshold']:g}, mean exit layer {row['mean_exit_layer']:.2f}): outside the "
            f"runtime {row['outside_runtime_p50_us']:.1f} µs, run_batch {row['run_batch_p50_us']:.1f} µs (p50s)"
        )
    if args.output:
        import model

        write_json({"command": command, "machine": machine, "source": str(Path(model.__file__).parents[1]),
                    **measured}, args.output)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
