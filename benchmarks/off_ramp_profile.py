"""Where an off-ramp's time goes at batch 1, measured inside the layer-by-layer loop.

The model cards' breakdown of an off-ramp's cost comes from here:

    python -m benchmarks.off_ramp_profile --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv

Sentence by sentence, the encoder runs layer by layer as the exit loop runs it; after each layer the off-ramp's
steps are timed one by one as the batch-1 loop runs them (pooling, the dense product, tanh + classifier, reading
the logits into Python, which waits for them, then entropy and exit decision on those numbers), each as the first
work after the layer, as in serving. The dense product is also timed with its
weight read into cache just before (what the weight's trip from memory costs), and the kernels the dense layer
could use are timed on a weight pushed out of cache by a 64 MiB write. Medians in µs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch.nn import functional as F

from model import exit_rule
from model.checkpoint import load_model
from model.data import read_dataset
from model.modeling import DeeBert, OffRamp
from model.tokenization import load_tokenizer, pad_batch, tokenize
from reports.common import machine_description
from reports.terminal import table


def profile_loop(model: DeeBert, batches: Sequence[Any], rounds: int) -> dict[str, list[int]]:
    """ns per step of each off-ramp, after each of layers 1..n-1 (the off-ramps that decide an early exit)."""
    rule = model.config.criterion
    threshold = 1e-9  # never met: every off-ramp runs, nobody leaves
    ramps = [cast(OffRamp, ramp) for ramp in model.off_ramps]
    steps: dict[str, list[int]] = {}

    def timed(name: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter_ns()
        value = function()
        steps.setdefault(name, []).append(time.perf_counter_ns() - started)
        return value

    with torch.inference_mode():
        for _ in range(rounds):
            for batch in batches:
                hidden = model.embed(batch.input_ids, batch.token_type_ids, batch.attention_mask)
                inputs = model.layer_inputs(hidden, batch.attention_mask)
                pool_weights = model.pool_weights(batch.attention_mask, hidden.dtype)
                for index in range(model.num_layers - 1):
                    hidden = model.run_layer(index + 1, hidden, inputs)
                    ramp = ramps[index]
                    weights = ramp._inference_weights()
                    if index % 2:  # every other layer: the dense weight read into cache first
                        weights.dense.sum()
                        pooled = ramp.pool(hidden, pool_weights)
                        dense = timed(
                            "dense (weight already in cache)",
                            lambda: torch.addmm(weights.dense_bias, pooled, weights.dense),  # noqa: B023
                        )
                    else:
                        pooled = timed("pooling", lambda: ramp.pool(hidden, pool_weights))  # noqa: B023
                        dense = timed("dense", lambda: torch.addmm(weights.dense_bias, pooled, weights.dense))  # noqa: B023
                    logits = timed(
                        "tanh + classifier",
                        lambda: torch.addmm(weights.classifier_bias, dense.tanh_(), weights.classifier),  # noqa: B023
                    )
                    # As the batch-1 loop (`DeeBert._exit_one`) does: read the logits once, decide in Python.
                    values = timed("logits to Python (host sync)", lambda: logits.tolist()[0])  # noqa: B023
                    probabilities, entropy = timed("entropy", lambda: exit_rule.entropy_of(values))  # noqa: B023
                    timed("exit decision", lambda: rule.leaves(probabilities, entropy, threshold, None))  # noqa: B023
    return steps


def profile_kernels(hidden_size: int, samples: int) -> dict[str, list[int]]:
    """ns of a batch-1 dense product by kernel and weight type, with the weight out of cache each time."""
    torch.manual_seed(0)
    weight = torch.randn(hidden_size, hidden_size) * 0.05
    bias = torch.zeros(hidden_size)
    x = torch.randn(1, hidden_size)
    by_column = weight.t().contiguous()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8)
    int8 = torch.round(weight / scales[:, None]).to(torch.int8)
    x16, w16, b16 = x.half(), weight.half(), bias.half()
    xb, bcol, bb = x.bfloat16(), by_column.bfloat16(), bias.bfloat16()
    variants: dict[str, Callable[[], Any]] = {
        "fp32 x @ W ([in, out] copy, as served)": lambda: torch.addmm(bias, x, by_column),
        "fp32 F.linear (x @ Wᵀ)": lambda: F.linear(x, weight, bias),
        "bf16 x @ W": lambda: torch.addmm(bb, xb, bcol),
        "fp16 F.linear": lambda: F.linear(x16, w16, b16),
        "int8 weight-only, bf16 input": lambda: torch.ops.aten._weight_int8pack_mm(xb, int8, scales.bfloat16()),
    }
    flush = torch.empty(64 * 2**20 // 4)
    times: dict[str, list[int]] = {}
    with torch.inference_mode():
        for name, function in variants.items():
            try:
                function()
            except (RuntimeError, NotImplementedError):
                continue  # not built into this torch
            for _ in range(samples):
                flush.add_(1.0)
                started = time.perf_counter_ns()
                function()
                times.setdefault(name, []).append(time.perf_counter_ns() - started)
    return times


def _print_medians(sections: dict[str, dict[str, list[int]]]) -> None:
    """Each section's title, then its median times, in columns lined up across the sections."""
    name_width = max(len(name) for times in sections.values() for name in times)
    for title, times in sections.items():
        rows = [[name, f"{statistics.median(ns) / 1000:.1f} µs", f"({len(ns)} samples)"] for name, ns in times.items()]
        print(title)
        print(table((), rows, align="<>", indent="  ", widths=(name_width, 9)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--samples", type=int, default=100, help="sentences from the data (100)")
    parser.add_argument("--rounds", type=int, default=4, help="passes over them (4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    data = read_dataset(args.data, label_names=model.config.labels)
    data = data.subset(range(min(args.samples, len(data))))
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, model.config.max_length)
    batches = [pad_batch([item], tokenizer.pad_token_id) for item in encoded]
    machine = machine_description()
    print(f"{model.config.name}, batch 1, {len(batches)} samples × {args.rounds} rounds, {args.threads} threads")
    print(f"machine: {machine['cpu']}, torch {machine['versions'].get('torch')}")
    _print_medians(
        {
            "off-ramp steps after an encoder layer (layers 1..n-1):": profile_loop(model, batches, args.rounds),
            "dense product at batch 1, weight out of cache:": profile_kernels(
                model.config.hidden_size, len(batches) * args.rounds
            ),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
