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
Every graph is opened and fed as the backend opens and feeds its own (OpenVINO's inputs padded to its length
bucket, as a lone row's are).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loadtest.report import write_json
from model.backends import load_backend
from model.checkpoint import load_model
from model.data import read_dataset
from model.onnx_export import EXIT_FILE, EXIT_THRESHOLD_INPUT, EXIT_WEIGHTS_FILE, PLAIN_FILE
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


def graph_feeds(steps: Any, graph: Any, ids: torch.Tensor, threshold: float) -> dict[str, np.ndarray]:
    """What `graph` (opened by the backend `steps`) takes for one unpadded row of token ids, built by the backend's
    own steps as a lone row's call builds them (`StepGraphModel.exit_in_one_call`; OpenVINO's length bucket
    included)."""
    mask = torch.ones_like(ids)
    token_ids, token_types, padded_mask = steps._token_arrays(ids, mask, None)
    inputs = {"input_ids": token_ids, "token_type_ids": token_types, "attention_mask": padded_mask}
    inputs[EXIT_THRESHOLD_INPUT] = np.array(threshold, dtype=np.float32)
    everything = steps._feeds(graph, steps.start(ids, mask, None), inputs)
    return {name: everything[name] for name in graph.inputs}


def open_graphs(steps: Any, paths: dict[str, Path], threads: int) -> dict[str, Any]:
    """name → each graph opened by the backend `steps` as it opens its own (`load_graph`); on ONNX Runtime the
    nested and flat graphs also with memory patterns off."""
    graphs = {name: steps.load_graph(path) for name, path in paths.items()}
    if steps.backend == "onnxruntime":
        from model.onnx_backend import _Graph, session_options

        for name in ("exit graph (nested)", "flattened"):
            options = session_options(threads)
            options.enable_mem_pattern = False
            graphs[f"{name}, memory patterns off"] = _Graph(paths[name], options)
    return graphs


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
    sentences = [pad_batch([e], int(tokenizer.pad_token_id or 0)).input_ids for e in encoded]
    fixed = [sentences[0]] * len(sentences)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".flat-") as scratch:
        flat = flatten_exit_graph(directory, Path(scratch))
        paths = {"plain": directory / PLAIN_FILE, "exit graph (nested)": directory / EXIT_FILE, "flattened": flat}
        graphs = open_graphs(steps, paths, settings.threads)
        inputs = {"one sentence again and again": fixed, "random dev sentences": sentences}
        results: dict[str, dict[str, float]] = {}
        for label, rows in inputs.items():
            prepared = {name: [graph_feeds(steps, graph, ids, 0.0) for ids in rows] for name, graph in graphs.items()}
            fastest = {name: [float("inf")] * len(rows) for name in graphs}
            for name, graph in graphs.items():  # warm-up: every shape once
                for feeds in prepared[name]:
                    graph.run(feeds)
            for _ in range(settings.rounds):
                order = list(graphs)
                rng.shuffle(order)
                for name in order:
                    run = graphs[name].run
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
