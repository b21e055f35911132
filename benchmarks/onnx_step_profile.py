"""Where the ONNX Runtime exit loop's batch-1 time goes, step by step (the ORT counterpart of off_ramp_profile).

    python -m benchmarks.onnx_step_profile --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv

Sentence by sentence (random dev sentences, one at a time, as a batch-1 request runs), three things are timed
in turn, in a fresh random order per sentence:

- the plain fused full-depth graph (the plain ONNX Runtime baseline);
- the loop's steps one by one with a threshold no row meets, so every step runs: `start` (token ids to numpy,
  the layers' mask), then each layer's call (the layer and its off-ramp in one graph), and the exit decision
  on the off-ramp's logits (reading them into Python, softmax, entropy, the rule);
- the whole loop (`infer`) at the threshold given (default: the `balanced` preset), with its exit layer. A lone
  row's `infer` runs the exit graph (the step graphs nested in one graph, `model.onnx_export.write_exit_graph`),
  so this row is one runtime call where the steps above are seven.

It prints medians per step and, per exit layer, the loop's time against the plain forward's and against the
ideal (plain × exit layer / n): where the loop pays beyond the layers it skips.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.report import write_json
from model import exit_rule
from model.backends import load_backend
from model.checkpoint import load_model
from model.data import read_dataset
from model.onnx_backend import OnnxDeeBert
from model.tokenization import load_tokenizer, pad_batch, tokenize
from reports.common import describe_machine, machine_description, number, percent
from reports.terminal import table


def profile(model: OnnxDeeBert, batches: list[Any], threshold: float, rounds: int, seed: int) -> dict[str, Any]:
    rule = model.config.criterion
    n = model.num_layers
    steps: dict[str, list[int]] = {}
    plain_ns: list[int] = []
    loop_ns: list[int] = []
    exit_layers: list[int] = []

    def timed(name: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter_ns()
        value = function()
        steps.setdefault(name, []).append(time.perf_counter_ns() - started)
        return value

    def every_step(batch: Any) -> None:
        state = timed("start (to numpy, layer mask)", lambda: model.start(*batch))
        for layer in range(1, n + 1):
            state = timed(f"layer {layer} + off-ramp {layer}", lambda: model.run_layer(state, layer))  # noqa: B023
            logits = timed("logits to Python", lambda: model.off_ramp_logits(state, layer).tolist()[0])  # noqa: B023
            probabilities, entropy = timed("entropy", lambda: exit_rule.entropy_of(logits))  # noqa: B023
            timed("exit decision", lambda: rule.leaves(probabilities, entropy, 0.0, None))  # noqa: B023

    order = random.Random(seed)
    for batch in batches[:10]:  # warm-up
        model.plain_forward(*batch)
        model.infer(batch[0], batch[1], batch[2], [threshold])
    for _ in range(rounds):
        for batch in batches:
            jobs = ["plain", "steps", "loop"]
            order.shuffle(jobs)
            for job in jobs:
                if job == "plain":
                    started = time.perf_counter_ns()
                    model.plain_forward(*batch)
                    plain_ns.append(time.perf_counter_ns() - started)
                elif job == "steps":
                    every_step(batch)
                else:
                    started = time.perf_counter_ns()
                    result = model.infer(batch[0], batch[1], batch[2], [threshold])
                    loop_ns.append(time.perf_counter_ns() - started)
                    exit_layers.append(result.exit_layer[0])
    count = len(batches)
    # Per sentence: the fastest of its rounds.
    plain = [min(plain_ns[r * count + i] for r in range(rounds)) for i in range(count)]
    loop = [min(loop_ns[r * count + i] for r in range(rounds)) for i in range(count)]
    layers = exit_layers[:count]
    by_layer = []
    for layer in range(1, n + 1):
        rows = [i for i in range(count) if layers[i] == layer]
        if not rows:
            continue
        loop_ms = statistics.fmean(loop[i] for i in rows) / 1e6
        plain_ms = statistics.fmean(plain[i] for i in rows) / 1e6
        by_layer.append(
            {
                "exit_layer": layer,
                "sentences": len(rows),
                "loop_ms": loop_ms,
                "plain_ms": plain_ms,
                "loop_over_plain": loop_ms / plain_ms,
                "ideal_over_plain": layer / n,
            }
        )
    return {
        "samples": count,
        "rounds": rounds,
        "threshold": threshold,
        "steps_median_us": {name: statistics.median(values) / 1e3 for name, values in steps.items()},
        "plain_mean_ms": statistics.fmean(plain) / 1e6,
        "loop_mean_ms": statistics.fmean(loop) / 1e6,
        "loop_over_plain": statistics.fmean(loop) / statistics.fmean(plain),
        "expected_saving": 1 - statistics.fmean(layers) / n,
        "by_exit_layer": by_layer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--threshold", default="balanced", help="a number or preset (default balanced)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    base = load_model(args.checkpoint).eval()
    model = load_backend(base, "onnxruntime", args.precision, threads=args.threads)
    assert isinstance(model, OnnxDeeBert)
    tokenizer = load_tokenizer(args.checkpoint)
    data = read_dataset(args.data, label_names=base.config.labels)
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, base.config.max_length)
    indices = random.Random(args.seed).sample(range(len(encoded)), min(args.samples, len(encoded)))
    batches = []
    for index in indices:
        batch = pad_batch([encoded[index]], int(tokenizer.pad_token_id or 0))
        batches.append((batch.input_ids, batch.attention_mask, batch.token_type_ids))
    threshold, _ = model.config.resolve_threshold(args.threshold)
    results = profile(model, batches, threshold, args.rounds, args.seed)
    results["machine"] = machine_description()
    results["command"] = "python -m benchmarks.onnx_step_profile " + " ".join(argv or sys.argv[1:])
    print(describe_machine(results["machine"]))
    print(f"{results['samples']} sentences x {results['rounds']} rounds, threshold {args.threshold} ({threshold:.4g})")
    steps = [[name, f"{value:.1f} µs"] for name, value in results["steps_median_us"].items()]
    print(table((), steps, align="<>", indent="  "))
    print(
        f"plain {results['plain_mean_ms']:.2f} ms, loop {results['loop_mean_ms']:.2f} ms "
        f"({results['loop_over_plain']:.3f}x; expected saving {percent(results['expected_saving'])})"
    )
    by_exit_layer = [
        [
            str(row["exit_layer"]),
            str(row["sentences"]),
            number(row["loop_ms"], 2, " ms"),
            number(row["plain_ms"], 2, " ms"),
            f"{row['loop_over_plain']:.3f}x",
            f"{row['ideal_over_plain']:.3f}x",
        ]
        for row in results["by_exit_layer"]
    ]
    headers = ["exit at", "sentences", "loop", "plain", "loop / plain", "ideal"]
    print(table(headers, by_exit_layer, align=">>>>>>", indent="  "))
    if args.output:
        write_json(results, Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
