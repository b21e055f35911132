"""What the exit graph's nesting costs: the same layers, off-ramps and rules with and without the `If` nodes.

    python -m benchmarks.exit_graph_structure --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv \
        --runtime onnxruntime --precision fp32

The exit graph (`model.onnx_export.write_exit_graph`) nests layer k+1 in the `If` that follows off-ramp k. Here a
copy of it is flattened: every `If` replaced by its else-branch, so the graph runs every layer, off-ramp and
rule one after another with nothing to branch on. At threshold 0 (no row leaves early) the nested graph runs
exactly the same operators, so nested − flat is what the nesting itself costs, per level entered:
(nested − flat) / (n − 1). The plain full-depth graph (one classifier, no off-ramps) is timed beside them.

Three inputs, each timed in turn per round: one sentence again and again (a fixed shape), and random dev
sentences one at a time (a new shape almost every call, as batch-1 requests come). Each sentence's time is the
fastest of its rounds; the mean over sentences is reported. On ONNX Runtime the nested and flat graphs are
also timed with memory patterns off (`enable_mem_pattern`), which planned buffers the subgraphs do not get.
Unpadded token ids throughout (the OpenVINO backend pads to its length bucket; here every length is its own).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.report import write_json
from model.backends import load_backend
from model.checkpoint import load_model
from model.data import read_dataset
from model.onnx_backend import pool_weights
from model.onnx_export import EXIT_FILE, EXIT_THRESHOLD_INPUT, EXIT_WEIGHTS_FILE, PLAIN_FILE, POOL_WEIGHTS
from model.tokenization import load_tokenizer, pad_batch, tokenize
from reports.common import describe_machine, machine_description, number
from reports.terminal import table

FLAT_FILE = "exit_flat.onnx"


def flatten_exit_graph(directory: Path, target: Path) -> Path:
    """A copy of `directory`'s exit graph in `target` with every `If` replaced by its else-branch (and
    Identity nodes naming the If's outputs): every level runs, nothing branches. Its weights file is copied beside
    it, where the graph's external data points."""
    import onnx
    from onnx import helper

    model = onnx.load(str(directory / EXIT_FILE), load_external_data=False)

    def inline(graph: Any) -> None:
        nodes = []
        for node in graph.node:
            if node.op_type != "If":
                nodes.append(node)
                continue
            branch = next(a.g for a in node.attribute if a.name == "else_branch")
            inline(branch)
            nodes += list(branch.node)
            nodes += [
                helper.make_node("Identity", [b.name], [o]) for o, b in zip(node.output, branch.output, strict=True)
            ]
            graph.initializer.extend(branch.initializer)
        del graph.node[:]
        graph.node.extend(nodes)

    inline(model.graph)
    for position, node in enumerate(model.graph.node):  # node names repeat across the branches they came from
        node.name = f"{node.name}_{position}"
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target / FLAT_FILE))
    shutil.copyfile(directory / EXIT_WEIGHTS_FILE, target / EXIT_WEIGHTS_FILE)  # runtimes refuse links for it
    return target / FLAT_FILE


def feeds_for(names: list[str], ids: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Inputs for a graph taking `names`, one unpadded row of token ids."""
    mask = np.ones_like(ids)
    values = {
        "input_ids": ids,
        "token_type_ids": np.zeros_like(ids),
        "attention_mask": mask,
        POOL_WEIGHTS: pool_weights(mask),
        EXIT_THRESHOLD_INPUT: np.array(threshold, dtype=np.float32),
    }
    # Any other input is fused attention's mask: each row's number of tokens.
    return {name: values.get(name, np.array([ids.shape[1]], dtype=np.int32)) for name in names}


def runners(steps: Any, paths: dict[str, Path], threads: int) -> dict[str, tuple[Callable[..., Any], list[str]]]:
    """name → (run(feeds), input names) for each graph, opened as `steps` (the backend) opens its own."""
    found: dict[str, tuple[Callable[..., Any], list[str]]] = {}
    if steps.backend == "onnxruntime":
        import onnxruntime as ort

        from model.onnx_backend import session_options

        for name, path in paths.items():
            for patterns in [True, False] if name != "plain" else [True]:
                options = session_options(threads)
                options.enable_mem_pattern = patterns
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                key = name if patterns else f"{name}, memory patterns off"
                found[key] = (lambda feeds, s=session: s.run(None, feeds), [i.name for i in session.get_inputs()])
        return found
    import openvino

    core = openvino.Core()
    properties = steps._properties  # the backend's own: precision hint, threads, latency hint, cache capacity
    for name, path in paths.items():
        compiled = core.compile_model(str(path), "CPU", properties)
        request = compiled.create_infer_request()
        found[name] = (lambda feeds, r=request: r.infer(feeds), [p.get_any_name() for p in compiled.inputs])
    return found


def measure(settings: argparse.Namespace) -> dict[str, Any]:
    model = load_model(settings.checkpoint)
    backend = load_backend(model, settings.runtime, settings.precision, settings.cache_dir, settings.threads)
    steps = backend.exit_steps()
    directory: Path = steps.directory  # type: ignore[attr-defined]
    n = model.num_layers
    tokenizer = load_tokenizer(settings.checkpoint)
    texts = read_dataset(settings.data, label_names=model.config.labels).texts
    rng = random.Random(settings.seed)
    chosen = rng.sample(range(len(texts)), min(settings.sentences, len(texts)))
    encoded = tokenize(tokenizer, [texts[i] for i in chosen], None, model.config.max_length)
    sentences = [pad_batch([e], int(tokenizer.pad_token_id or 0)).input_ids.numpy() for e in encoded]
    fixed = [sentences[0]] * len(sentences)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".flat-") as scratch:
        flat = flatten_exit_graph(directory, Path(scratch))
        paths = {"plain": directory / PLAIN_FILE, "exit graph (nested)": directory / EXIT_FILE, "flattened": flat}
        graphs = runners(steps, paths, settings.threads)
        inputs = {"one sentence again and again": fixed, "random dev sentences": sentences}
        results: dict[str, dict[str, float]] = {}
        for label, rows in inputs.items():
            prepared = {name: [feeds_for(names, ids, 0.0) for ids in rows] for name, (_, names) in graphs.items()}
            fastest = {name: [float("inf")] * len(rows) for name in graphs}
            for name, (run, _) in graphs.items():  # warm-up: every shape once
                for feeds in prepared[name]:
                    run(feeds)
            for _ in range(settings.rounds):
                order = list(graphs)
                rng.shuffle(order)
                for name in order:
                    run = graphs[name][0]
                    for position, feeds in enumerate(prepared[name]):
                        started = time.perf_counter_ns()
                        run(feeds)
                        fastest[name][position] = min(fastest[name][position], time.perf_counter_ns() - started)
                if settings.progress:
                    print(f"exit_graph_structure: {label}: round done", file=sys.stderr)
            results[label] = {name: statistics.fmean(times) / 1e3 for name, times in fastest.items()}
    per_level: dict[str, dict[str, float]] = {}
    for label, means in results.items():
        per_level[label] = {
            "nested − flat per level (µs)": (means["exit graph (nested)"] - means["flattened"]) / (n - 1)
        }
        if "exit graph (nested), memory patterns off" in means:
            off = means["exit graph (nested), memory patterns off"] - means["flattened, memory patterns off"]
            per_level[label]["the same, memory patterns off"] = off / (n - 1)
    return {
        "command": " ".join(["python -m benchmarks.exit_graph_structure", *sys.argv[1:]]),
        "machine": machine_description(),
        "settings": {k: v for k, v in vars(settings).items() if k != "output"},
        "num_layers": n,
        "mean_us": results,
        "nesting_cost": per_level,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    parser.add_argument("--precision", default="fp32", help="fp32 (both runtimes) or bf16 (OpenVINO)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    settings = parser.parse_args(argv)
    results = measure(settings)
    print(describe_machine(results["machine"]))
    rows = [[label, *(number(value, 1) for value in means.values())] for label, means in results["mean_us"].items()]
    names = list(next(iter(results["mean_us"].values())))
    print(table(["input (mean µs at threshold 0)", *names], rows))
    for label, costs in results["nesting_cost"].items():
        print(f"{label}: " + ", ".join(f"{k} {number(v, 1)}" for k, v in costs.items()))
    if settings.output:
        write_json(results, settings.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
