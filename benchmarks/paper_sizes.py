"""What early exit saves at the paper's model sizes on this CPU: random-weight BERT-base (12 x 768) and
BERT-large (24 x 1024) shaped DeeBERT models replaying the shipped checkpoint's exit layers.

Timing does not depend on weight values, so each sentence of SST-2 dev leaves at the layer the shipped 6-layer
checkpoint left at (at `balanced`, on ONNX Runtime fp32), scaled to the depth (layer l of 6 -> round(l * n / 6)).
A replay criterion makes it leave there: the same per-layer work (layer, off-ramp, one exit decision) as the
entropy rule. Accuracy is not measured here (random weights). Measured saving = 1 - time(exit loop) /
time(full depth on the same runtime, its one-call graph), against the expected saving of the replayed layers.

    python -m benchmarks.paper_sizes --threads 2   # about 15 minutes on 2 cores
    python -m benchmarks.paper_sizes --device cuda --runtimes torch-float16 --exits-backend torch \
        --batch-size 1,64,256   # a GPU: PyTorch in float16

The random models' exported graphs (1.3 GB for BERT-base, 4 GB for BERT-large, per runtime) go to a scratch
cache removed at the end, unless `--shape-cache-dir` keeps them (a later run of the same shapes then skips the
export); the shipped checkpoint's graphs use the usual cache (`--cache-dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from model import exit_rule
from model.saving import expected_saving

BERT_VOCAB_SIZE = 30522  # bert-base-uncased's, so embedding tables have the paper's size
SHAPES = {
    # The shipped checkpoint's own shape (all-MiniLM-L6-v2): early exit's cost where only this size was measured.
    "minilm-l6": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
}


class ReplayCriterion(exit_rule.PatienceCriterion):
    """Leave at the layer given as the threshold (1..n; 0 = full depth): a replay of recorded exits."""

    name: ClassVar[str] = "replay"

    def step(self, probabilities: torch.Tensor, entropy: torch.Tensor, thresholds: torch.Tensor, state: Any) -> Any:
        layer = torch.ones_like(thresholds) if state is None else state + 1
        return (thresholds > 0) & (layer >= thresholds), layer

    def leaves(self, probabilities: Sequence[float], entropy: float, threshold: float, state: Any) -> Any:
        layer = 1 if state is None else state + 1
        return threshold > 0 and layer >= threshold, layer

    def never_exits_early(self, thresholds: torch.Tensor, num_layers: int) -> torch.Tensor:
        return (thresholds <= 0) | (thresholds >= num_layers)

    def never_exits_early_at(self, threshold: float, num_layers: int) -> bool:
        return threshold <= 0 or threshold >= num_layers


def shipped_exit_layers(
    checkpoint: str, data: str, cache_dir: str | None, threads: int, backend: str = "onnxruntime"
) -> tuple[list[Any], list[int], int]:
    """The shipped checkpoint's tokenized dev sentences and their exit layers at balanced, in fp32 on the CPU
    (`backend`: ONNX Runtime, or PyTorch where ONNX Runtime cannot export; the two agree on every exit layer of
    the shipped checkpoints, loadtest/results/backend_parity/)."""
    from model.backends import load_backend
    from model.checkpoint import load_model
    from model.data import read_dataset
    from model.tokenization import load_tokenizer, pad_batch, tokenize

    model = load_model(checkpoint).eval()
    served = load_backend(model, backend, "fp32", cache_dir, threads)
    tokenizer = load_tokenizer(checkpoint)
    dataset = read_dataset(data, label_names=model.config.labels)
    encoded = tokenize(tokenizer, dataset.texts, dataset.text_pairs, model.config.max_length)
    threshold, _ = served.config.resolve_threshold("balanced")
    layers: list[int] = []
    for start in range(0, len(encoded), 64):
        batch = pad_batch(encoded[start : start + 64], 0)
        rows = batch.input_ids.shape[0]
        layers += served.infer(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * rows
        ).exit_layer
    return encoded, layers, model.num_layers


def replayed_layers(layers: Sequence[int], shipped_depth: int, depth: int) -> list[int]:
    """The shipped checkpoint's exit layers scaled to a model of `depth` layers (layer l of the shipped depth ->
    round(l * depth / shipped_depth), within 1..depth)."""
    return [max(1, min(depth, round(layer * depth / shipped_depth))) for layer in layers]


def random_deebert(shape: str, vocab_size: int = BERT_VOCAB_SIZE, seed: int = 0) -> Any:
    from model.config import DeeBertConfig
    from model.modeling import DeeBert

    torch.manual_seed(seed)
    backbone = {
        "model_type": "bert",
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        **SHAPES[shape],
    }
    config = DeeBertConfig(backbone=backbone, labels=["negative", "positive"], max_length=128, name=f"random-{shape}")
    return DeeBert(config).eval()


def measure(
    served: Any,
    encoded: Sequence[Any],
    targets: Sequence[int],
    rows: Sequence[int],
    batch_sizes: Sequence[int],
    rounds: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Full depth vs the replayed exits on `served`: batch 1 over `rows` (per sentence the fastest of `rounds`)
    and in length-sorted batches of each of `batch_sizes` over every sentence (the fastest round). Inputs go to
    `device` (default: the CPU) and each call is waited for there."""
    from model.device import synchronize
    from model.tokenization import groups_by_length, pad_batch

    rule = ReplayCriterion()
    n = served.num_layers
    on = device or torch.device("cpu")

    def run(batch: Any, thresholds: list[float]) -> None:
        served.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, criterion=rule)
        synchronize(on)

    singles = [(pad_batch([encoded[r]], 0).to(on), float(targets[r])) for r in rows]
    full_ns = [math.inf] * len(singles)
    exit_ns = [math.inf] * len(singles)
    for _ in range(rounds + 1):  # the first round warms kernels for these shapes
        for i, (batch, target) in enumerate(singles):
            for thresholds, times in (([0.0], full_ns), ([target], exit_ns)):
                started = time.perf_counter_ns()
                run(batch, thresholds)
                times[i] = min(times[i], time.perf_counter_ns() - started)
    expected_single = expected_saving([targets[r] for r in rows], n) or 0.0
    expected_all = expected_saving(targets, n) or 0.0
    single_saving = 1 - statistics.fmean(exit_ns) / statistics.fmean(full_ns)
    figures: dict[str, Any] = {
        "batch1_full_ms": statistics.fmean(full_ns) / 1e6,
        "batch1_exit_ms": statistics.fmean(exit_ns) / 1e6,
        "batch1_expected_saving": expected_single,
        "batch1_measured_saving": single_saving,
        "batch1_measured_over_expected": single_saving / expected_single if expected_single else None,
        "batched_expected_saving": expected_all,
    }
    for batch_size in batch_sizes:
        groups = groups_by_length(encoded, batch_size)
        batches = [(pad_batch([encoded[i] for i in g], 0).to(on), [float(targets[i]) for i in g]) for g in groups]
        best = {"full": math.inf, "exit": math.inf}
        for _ in range(rounds + 1):
            for which in best:
                started = time.perf_counter_ns()
                for batch, thresholds in batches:
                    run(batch, [0.0] * len(thresholds) if which == "full" else thresholds)
                best[which] = min(best[which], time.perf_counter_ns() - started)
        saving = 1 - best["exit"] / best["full"]
        figures[f"batch{batch_size}_full_per_s"] = len(encoded) / (best["full"] / 1e9)
        figures[f"batch{batch_size}_exit_per_s"] = len(encoded) / (best["exit"] / 1e9)
        figures[f"batch{batch_size}_measured_saving"] = saving
        figures[f"batch{batch_size}_measured_over_expected"] = saving / expected_all if expected_all else None
    return figures


def rows_for_batches(total: int, wanted: int) -> list[int]:
    """The sentences the passes use: all, or a seeded sample of `wanted` (in dev order)."""
    if not wanted or wanted >= total:
        return list(range(total))
    return sorted(random.Random(1).sample(range(total), wanted))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--shapes", default="bert-base,bert-large")
    parser.add_argument(
        "--runtimes",
        default="onnxruntime-fp32,openvino-bf16",
        help="backend-precision, each run; PyTorch as torch-DTYPE (torch-float32, torch-float16, torch-bfloat16)",
    )
    parser.add_argument("--device", default="cpu", help="where PyTorch runtimes run: cpu, cuda or cuda:N")
    parser.add_argument(
        "--exits-backend",
        default="onnxruntime",
        choices=["onnxruntime", "torch"],
        help="which runtime finds the shipped checkpoint's exit layers (fp32, CPU)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch1-rows", type=int, default=40)
    parser.add_argument("--batch-size", default="32", help="comma-separated batch sizes of the passes")
    parser.add_argument("--batched-rows", type=int, default=256, help="sentences in the passes (0 = all)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache-dir", help="the shipped checkpoint's graphs (default: the usual cache)")
    parser.add_argument(
        "--shape-cache-dir", help="keep the random models' graphs here (default: a scratch cache removed at the end)"
    )
    parser.add_argument("--output", default="benchmarks/results/paper_sizes/paper_sizes.json")
    args = parser.parse_args(argv)

    from reports.common import machine_description

    torch.set_num_threads(args.threads)
    encoded, layers, shipped_depth = shipped_exit_layers(
        args.checkpoint, args.data, args.cache_dir, args.threads, args.exits_backend
    )
    results: dict[str, Any] = {
        "command": "python -m benchmarks.paper_sizes " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "shipped_expected_saving": expected_saving(layers, shipped_depth),
        "accuracy": "not measured: random weights replaying the shipped checkpoint's exit layers",
        "shapes": {},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as scratch:
        shape_cache = args.shape_cache_dir or scratch.enter_context(tempfile.TemporaryDirectory(prefix="paper-sizes-"))
        measure_shapes(args, encoded, layers, shipped_depth, shape_cache, results, output)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def measure_shapes(
    args: argparse.Namespace,
    encoded: Sequence[Any],
    layers: Sequence[int],
    shipped_depth: int,
    shape_cache: str,
    results: dict[str, Any],
    output: Path,
) -> None:
    """Each shape on each runtime, its graphs exported into `shape_cache`; `results` written after each."""
    from model.device import describe_device

    batch_sizes = [int(size) for size in args.batch_size.split(",") if size.strip()]
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model = random_deebert(shape)
        n = model.num_layers
        targets = replayed_layers(layers, shipped_depth, n)
        results["shapes"][shape] = {}
        for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
            backend, _, precision = runtime.rpartition("-")
            print(f"paper_sizes: {shape} on {runtime}", file=sys.stderr, flush=True)
            served, device = serve_shape(model, backend, precision, shape_cache, args)
            chosen = rows_for_batches(len(encoded), args.batched_rows)
            singles = sorted(random.Random(0).sample(range(len(chosen)), min(args.batch1_rows, len(chosen))))
            sentences, replayed = [encoded[i] for i in chosen], [targets[i] for i in chosen]
            results["shapes"][shape][runtime] = {
                "device": describe_device(device),
                **measure(served, sentences, replayed, singles, batch_sizes, args.rounds, device),
            }
            print(json.dumps(results["shapes"][shape][runtime]), file=sys.stderr, flush=True)
            output.write_text(json.dumps(results, indent=2) + "\n")  # what is measured so far
            del served
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model


def serve_shape(
    model: Any, backend: str, precision: str, shape_cache: str, args: argparse.Namespace
) -> tuple[Any, torch.device]:
    """The random model on a runtime: PyTorch (`torch-DTYPE`) on `--device` in that dtype (a copy), any other
    backend-precision exported on the CPU as `deebert serve` loads it."""
    from model.backends import load_backend
    from model.device import DTYPES, pick_device, prepare

    if backend == "torch":
        device = pick_device(args.device)
        if precision not in DTYPES:
            names = ", ".join(DTYPES)
            raise SystemExit(f"paper_sizes: torch-{precision}: PyTorch runtimes are named by dtype ({names})")
        prepare(device)
        return copy.deepcopy(model).to(device=device, dtype=DTYPES[precision]).eval(), device
    return load_backend(model, backend, precision, shape_cache, args.threads), torch.device("cpu")


if __name__ == "__main__":
    raise SystemExit(main())
