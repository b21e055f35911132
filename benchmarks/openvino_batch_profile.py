"""Where the OpenVINO exit loop's batch time goes: its step graphs against the plain graph, in one process.

    python -m benchmarks.openvino_batch_profile --checkpoint weights/sst2-minilm-l6 \\
        --data ../shared/data/sst2/dev.tsv --output loadtest/results/openvino/batch_profile.json

The data set sorted by length in batches of 32 (dynamic padding), as the peers run's batched pass. Interleaved
in one process, `--rounds` times each (a shared VM's speed drifts over seconds; pairs measured side by side
compare, separate runs do not):

- `plain`: the plain full-depth graph, one call per batch (what plain OpenVINO runs);
- `chain`: the loop's step graphs one after another on every row, no exit (the loop's cost of full depth);
- `balanced`: the exit loop at the threshold given, with compaction;
- `balanced, each batch twice (the second timed)`: every layer graph's call sees the shape its previous call
  had, so OpenVINO prepares no graph again (what shape changes cost the loop);
- `plain, random batches` and `balanced, random batches`: the same sentences in random batches of 32, lengths
  mixed as in a server's batches; `balanced, random batches in two halves`: each of those batches run as two,
  its shorter and its longer half (less padding, twice the calls);
- `balanced, hidden states copied out`: the loop as the backend ran it before its layer graphs' hidden states
  were read from the request's buffer (every output copied out of every call), with its speed against the
  backend's;
- `balanced, f32 edges` (bf16 only): the same on step graphs that take and return their hidden states as f32,
  converting them at every call (the backend before its bf16 hand-over), with its accuracy and its labels
  against the backend's.

The expected saving at the threshold, per sentence and per token. Then, per graph at fixed shapes with
OpenVINO's per-node counters (PERF_COUNT), the plain graph's time per layer against one layer graph's, by node
type; and the cost of a shape change between calls of one graph (two shapes alternating against each
repeated).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.report import write_json
from model.backends import load_backend
from model.checkpoint import load_model
from model.data import read_dataset
from model.onnx_backend import POOL_WEIGHTS
from model.onnx_export import PLAIN_FILE, layer_file
from model.openvino_backend import OpenVinoDeeBert, _bf16_hidden_ports, _OpenVinoGraph
from model.saving import expected_saving, saving_from_totals
from model.tokenization import groups_by_length, load_tokenizer, pad_batch, tokenize
from reports.common import describe_machine, machine_description
from reports.terminal import table


class _F32Edges(OpenVinoDeeBert):
    """The exit loop in bf16 on step graphs that take and return their hidden states as f32, converting them at
    every call, as the backend's did before the bf16 hand-over (BENCHMARKS.md §10, §13)."""

    @property
    def bf16_hidden(self) -> bool:
        return False


class _CopiedOutputsGraph(_OpenVinoGraph):
    """A step graph as the backend ran it before its hidden states were shared: `infer` copies every output
    into an array of its own."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.payloads(list(self._request().infer(self.typed(feeds), share_inputs=True).to_tuple()))


class _CopiedOutputs(OpenVinoDeeBert):
    """The exit loop on `_CopiedOutputsGraph`s (what reading the hidden states from the request's buffer gained:
    BENCHMARKS.md §14)."""

    def load_graph(self, path: Path) -> Any:
        return _CopiedOutputsGraph(self._core, path, self._properties, bf16_hidden=self.bf16_hidden)


def _pair_ratios(times: dict[str, list[float]], slower: str, faster: str) -> dict[str, float]:
    """Round by round, `slower`'s time over `faster`'s: median, min and max of those pairs."""
    ratios = [a / b for a, b in zip(times[slower], times[faster], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _interleaved(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each candidate: its wall time, or the float it returns (the part it timed itself)."""
    for run in candidates.values():  # warm-up: every shape's kernels prepared once
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started = time.perf_counter()
            timed = run()
            times[name].append(timed if isinstance(timed, float) else time.perf_counter() - started)
    return times


def _hidden(model: OpenVinoDeeBert, values: np.ndarray) -> np.ndarray:
    """Hidden states as `model`'s layer graphs take them: f32, or (bf16 hand-over) the bfloat16 payload."""
    return (values.view(np.uint32) >> 16).astype(np.uint16) if model.bf16_hidden else values


def _node_times(model: OpenVinoDeeBert, rows: int, tokens: int, hidden_size: int, repeats: int) -> dict[str, Any]:
    """Per node type, ms per call, of the plain graph (divided by the layer count) and of layer graph 2 (with the
    backend's edges: bf16 hand-over in bf16)."""
    import openvino

    core = openvino.Core()
    properties = {**model._properties, "PERF_COUNT": True}
    rng = np.random.default_rng(0)
    arrays = {
        "input_ids": rng.integers(1000, 2000, (rows, tokens)),
        "attention_mask": np.ones((rows, tokens), np.int64),
        "token_type_ids": np.zeros((rows, tokens), np.int64),
        "hidden_1": _hidden(model, rng.standard_normal((rows, tokens, hidden_size), dtype=np.float32)),
        POOL_WEIGHTS: np.full((rows, tokens, 1), 1 / tokens, np.float32),
    }
    out: dict[str, Any] = {"shape": [rows, tokens]}
    for name, file, divide in (("plain, per layer", PLAIN_FILE, model.num_layers), ("layer graph", layer_file(2), 1)):
        graph = core.read_model(str(model.directory / file))
        bf16_inputs: frozenset[str] = frozenset()
        if model.bf16_hidden:
            graph, bf16_inputs, _ = _bf16_hidden_ports(graph)
        compiled = core.compile_model(graph, "CPU", properties)
        request = compiled.create_infer_request()
        feeds = {port.get_any_name(): arrays[port.get_any_name()] for port in compiled.inputs}
        for port in bf16_inputs:
            feeds[port] = openvino.Tensor(feeds[port], feeds[port].shape, openvino.Type.bf16)
        for _ in range(5):
            request.infer(feeds, share_inputs=True)
        started = time.perf_counter()
        for _ in range(repeats):
            request.infer(feeds, share_inputs=True)
        wall = (time.perf_counter() - started) / repeats
        nodes: dict[str, float] = defaultdict(float)
        for info in request.profiling_info:
            nodes[info.node_type] += info.real_time.total_seconds() * 1e3 / divide
        out[name] = {"wall_ms": wall * 1e3 / divide, "nodes_ms": dict(sorted(nodes.items(), key=lambda kv: -kv[1]))}
    return out


def _shape_change(model: OpenVinoDeeBert, hidden_size: int, repeats: int) -> list[dict[str, Any]]:
    """ms per call of layer graph 2: shape A repeated, B repeated, and A, B alternating."""
    graph = model.layers[1]
    rng = np.random.default_rng(0)

    def feeds(rows: int, tokens: int) -> dict[str, np.ndarray]:
        hidden = _hidden(model, rng.standard_normal((rows, tokens, hidden_size), dtype=np.float32))
        values: dict[str, np.ndarray] = {"hidden_1": hidden, "attention_mask": np.ones((rows, tokens), np.int64)}
        values[POOL_WEIGHTS] = np.full((rows, tokens, 1), 1 / tokens, np.float32)
        return {name: values[name] for name in graph.inputs}

    def per_call(sequence: list[dict[str, np.ndarray]]) -> float:
        for f in sequence:
            graph.run(f)
        best = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                for f in sequence:
                    graph.run(f)
            best.append((time.perf_counter() - started) / (repeats * len(sequence)))
        return min(best) * 1e3

    rows_out = []
    for a, b in (((1, 24), (2, 24)), ((4, 24), (5, 24)), ((20, 16), (21, 16)), ((20, 32), (20, 40))):
        fa, fb = feeds(*a), feeds(*b)
        alone_a, alone_b, alternating = per_call([fa]), per_call([fb]), per_call([fa, fb])
        rows_out.append({"a": list(a), "b": list(b), "a_ms": alone_a, "b_ms": alone_b, "alternating_ms": alternating,
                         "extra_per_call_ms": alternating - (alone_a + alone_b) / 2})  # fmt: skip
    return rows_out


def _savings(
    model: OpenVinoDeeBert, batches: list[Any], groups: list[list[int]], lengths: list[int], threshold: float
) -> dict[str, float | None]:
    """`balanced`'s expected saving counted per sentence (the paper's) and per token (Σ tokens · exit layer over
    n · Σ tokens): a layer's cost grows with a row's tokens, and long sentences tend to leave later."""
    exit_layers = [0] * len(lengths)
    for group, b in zip(groups, batches, strict=True):
        result = model.infer(b.input_ids, b.attention_mask, b.token_type_ids, [threshold] * len(b.input_ids))
        for row, layer in zip(group, result.exit_layer, strict=True):
            exit_layers[row] = layer
    n = model.num_layers
    return {
        "sentences": expected_saving(exit_layers, n),
        "tokens": saving_from_totals(sum(t * e for t, e in zip(lengths, exit_layers, strict=True)), n * sum(lengths)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--threshold", default="balanced", help="a number or preset (default balanced)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the random batches")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch_model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_backend(torch_model, "openvino", args.precision, None, threads=args.threads)
    assert isinstance(model, OpenVinoDeeBert)
    threshold, _ = model.config.resolve_threshold(args.threshold)
    data = read_dataset(args.data, label_names=model.config.labels)
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, model.config.max_length)
    groups = groups_by_length(encoded, args.batch_size)
    pad = int(tokenizer.pad_token_id or 0)
    batches = [pad_batch([encoded[i] for i in group], pad) for group in groups]
    shuffled = list(range(len(encoded)))
    random.Random(args.seed).shuffle(shuffled)
    mixed = [[encoded[i] for i in shuffled[k : k + args.batch_size]] for k in range(0, len(shuffled), args.batch_size)]
    mixed_batches = [pad_batch(group, pad) for group in mixed]
    halves = [
        pad_batch(half, pad)
        for group in mixed
        for ordered in [sorted(group, key=len)]
        for half in (ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :])
        if half
    ]

    def loop(backend: OpenVinoDeeBert, value: float) -> Callable[[], list[int]]:
        def run() -> list[int]:
            labels = [0] * len(encoded)
            for group, b in zip(groups, batches, strict=True):
                result = backend.infer(b.input_ids, b.attention_mask, b.token_type_ids, [value] * len(b.input_ids))
                for row, label in zip(group, result.label, strict=True):
                    labels[row] = label
            return labels

        return run

    def plain() -> None:
        for b in batches:
            model.plain_forward(b.input_ids, b.attention_mask, b.token_type_ids)

    def plain_mixed() -> None:
        for b in mixed_batches:
            model.plain_forward(b.input_ids, b.attention_mask, b.token_type_ids)

    def exits_on(chosen: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for b in chosen:
                model.infer(b.input_ids, b.attention_mask, b.token_type_ids, [threshold] * len(b.input_ids))

        return run

    def each_batch_twice() -> float:
        seconds = 0.0
        for b in batches:
            thresholds = [threshold] * len(b.input_ids)
            model.infer(b.input_ids, b.attention_mask, b.token_type_ids, thresholds)
            started = time.perf_counter()
            model.infer(b.input_ids, b.attention_mask, b.token_type_ids, thresholds)
            seconds += time.perf_counter() - started
        return seconds

    def chain() -> None:
        for b in batches:
            model.all_off_ramp_logits(b.input_ids, b.attention_mask, b.token_type_ids)

    ours_run = loop(model, threshold)
    candidates: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "chain": chain,
        args.threshold: ours_run,
        f"{args.threshold}, each batch twice (the second timed)": each_batch_twice,
        "plain, random batches": plain_mixed,
        f"{args.threshold}, random batches": exits_on(mixed_batches),
        f"{args.threshold}, random batches in two halves": exits_on(halves),
    }
    copied = f"{args.threshold}, hidden states copied out (before they were shared)"
    copying = _CopiedOutputs(model.config, model.directory, model.manifest, model.inference_precision, args.threads)
    candidates[copied] = loop(copying, threshold)
    f32_edges = f"{args.threshold}, f32 edges (before the bf16 hand-over)"
    if args.precision == "bf16":
        tried = _F32Edges(model.config, model.directory, model.manifest, "bf16", args.threads)
        tried_run = candidates[f32_edges] = loop(tried, threshold)
    print(f"timing {len(candidates)} candidates x {args.rounds} rounds, interleaved", file=sys.stderr)
    times = _interleaved(candidates, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}

    def versus_plain(name: str) -> float:
        """The median time over plain's on the same batches (sorted, or random)."""
        return medians[name] / medians["plain, random batches" if "random batches" in name else "plain"]

    rows = [[name, f"{len(encoded) / seconds:.0f}", f"{versus_plain(name):.2f}"] for name, seconds in medians.items()]
    hidden_size = torch_model.config.hidden_size
    results: dict[str, Any] = {
        "command": "python -m benchmarks.openvino_batch_profile "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "precision": args.precision,
        "threshold": threshold,
        "sentences": len(encoded),
        "seconds": times,
        "sentences_per_s": {name: len(encoded) / s for name, s in medians.items()},
        "node_times": [_node_times(model, 32, tokens, hidden_size, 20) for tokens in (16, 32)],
        "shape_change": _shape_change(model, hidden_size, 20),
        "expected_saving": _savings(model, batches, groups, [len(e) for e in encoded], threshold),
        "shared_hidden_states": {"speedup": _pair_ratios(times, copied, args.threshold)},
    }
    if args.precision == "bf16":
        ours, tried_labels = ours_run(), tried_run()
        gold = data.labels or []

        def accuracy(labels: list[int]) -> float:
            return sum(a == g for a, g in zip(labels, gold, strict=True)) / len(gold) if gold else float("nan")

        results["bf16_hand_over"] = {  # what the backend's bf16 hand-over gains over f32 edges
            "speedup": _pair_ratios(times, f32_edges, args.threshold),
            "labels_equal": sum(a == b for a, b in zip(ours, tried_labels, strict=True)),
            "accuracy": accuracy(ours),
            "accuracy_f32_edges": accuracy(tried_labels),
        }
    print(describe_machine(results["machine"]))
    print(table(["pass", "sentences/s", "time vs plain (on the same batches)"], rows))
    for entry in results["node_times"]:
        plain_layer, layer = entry["plain, per layer"], entry["layer graph"]
        wall = plain_layer["wall_ms"], layer["wall_ms"]
        print(f"shape {entry['shape']}: plain {wall[0]:.2f} ms per layer, layer graph {wall[1]:.2f} ms")
        for node in list(layer["nodes_ms"])[:6]:
            plain_ms, layer_ms = plain_layer["nodes_ms"].get(node, 0.0), layer["nodes_ms"][node]
            print(f"  {node}: plain {plain_ms:.3f} ms, layer graph {layer_ms:.3f}")
    shared = results["shared_hidden_states"]["speedup"]
    print(f"hidden states shared instead of copied out: {shared['median']:.3f}x (median of pairs)")
    savings = results["expected_saving"]
    print(f"expected saving at {args.threshold}: {savings['sentences']:.1%} of sentence-layers, "
          f"{savings['tokens']:.1%} of token-layers")  # fmt: skip
    for entry in results["shape_change"]:
        print(f"shape change {entry['a']} <-> {entry['b']}: +{entry['extra_per_call_ms']:.3f} ms per call")
    if "bf16_hand_over" in results:
        tried_result = results["bf16_hand_over"]
        print(
            f"bf16 hand-over over f32 edges: {tried_result['speedup']['median']:.3f}x (median of pairs), labels "
            f"equal on {tried_result['labels_equal']} of {len(encoded)}, accuracy {tried_result['accuracy']:.2%} "
            f"against {tried_result['accuracy_f32_edges']:.2%} with f32 edges"
        )
    if args.output:
        write_json(results, Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
