"""What int8 costs in accuracy, and what wins some of it back: one row per way of quantizing the encoder.

    python -m benchmarks.int8_tries --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv \\
        --calibration ../shared/data/sst2/train.tsv --output loadtest/results/int8

Every try keeps the embeddings and every off-ramp in fp32 (the exit decisions read fp32 logits) and quantizes
the encoder layers' matrix products to int8:

- dynamic, all MatMuls + attention, per-tensor weights (`deebert export --precision int8 --quantize all
  --weight-scales per-tensor`) and per-channel;
- dynamic, only the two feed-forward products, per-tensor and per-channel (the default of
  `deebert export --precision int8` and `DEEBERT_PRECISION=int8`);
- static (QDQ, activations' ranges calibrated on training sentences run through the fp32 layers), the
  MatMuls outside fused attention, per-channel weights.

For each: every off-ramp's dev accuracy (batches of 32, sorted by length), full-depth accuracy (also alone
and in batches of 64: dynamic quantization's answers depend on the batch), presets
calibrated on its own outputs as `deebert calibrate` does (so `balanced` is within 0.5 point of *its* full
depth), and `balanced` against fp32 full depth, the bar for int8 to become a default.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.calibrate import calibrate
from model.checkpoint import load_model
from model.data import read_dataset
from model.evaluate import all_layer_outputs, per_layer_accuracy
from model.onnx_backend import OnnxDeeBert, export, pool_weights
from model.onnx_export import POOL_WEIGHTS, Manifest, Quantization, export_graphs, layer_file
from model.tokenization import Encoded, load_tokenizer, pad_batch, tokenize
from reports.common import describe_machine, machine_description, markdown_table

DYNAMIC_TRIES = {
    "dynamic, all MatMuls, per-tensor": Quantization("all", False),
    "dynamic, all MatMuls, per-channel": Quantization("all", True),
    "dynamic, feed-forward only, per-tensor": Quantization("ffn", False),
    "dynamic, feed-forward only, per-channel (default)": Quantization("ffn", True),
}
BATCH_SIZES = (1, 32, 64)
STATIC_TRY = "static QDQ (calibrated on training sentences), MatMuls, per-channel"


def _static(model: Any, fp32_directory: Path, directory: Path, calibration: Sequence[Encoded], pad_id: int) -> None:
    """Copy the fp32 export into `directory` with each layer graph statically quantized (QDQ) on the
    activations the fp32 layers produce for the calibration sentences (batch 1, as served).

    The activations come from the PyTorch model (the same numbers as the fp32 graphs to 1e-6): ONNX Runtime's
    calibrator makes sessions with threads of their own, which it refuses once a process has made sessions on
    the global thread pool, so this runs before any."""
    import shutil

    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    manifest = Manifest.read(fp32_directory)
    feeds: list[list[dict[str, np.ndarray]]] = [[] for _ in range(model.num_layers)]
    with torch.inference_mode():
        for item in calibration:
            batch = pad_batch([item], pad_id)
            mask = batch.attention_mask.numpy()
            common = {
                "attention_mask": mask,
                manifest.layer_mask_input: mask.sum(axis=1, dtype=np.int32),
                POOL_WEIGHTS: pool_weights(mask),
            }
            hidden = model.embed(batch.input_ids, batch.token_type_ids, batch.attention_mask)
            inputs = model.layer_inputs(hidden, batch.attention_mask)
            for index in range(model.num_layers):
                if index == 0:
                    step = {"input_ids": batch.input_ids.numpy(), "token_type_ids": batch.token_type_ids.numpy()}
                else:
                    step = {f"hidden_{index}": hidden.numpy().copy()}
                feeds[index].append({**common, **step})
                hidden = model.run_layer(index + 1, hidden, inputs)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, rows: list[dict[str, np.ndarray]], names: set[str]) -> None:
            self.rows: Iterator[dict[str, np.ndarray]] = iter(
                [{k: v for k, v in r.items() if k in names} for r in rows]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    import onnx

    shutil.copytree(fp32_directory, directory, dirs_exist_ok=True)
    for layer_number in range(1, model.num_layers + 1):
        path = directory / layer_file(layer_number)
        names = {i.name for i in onnx.load(str(path)).graph.input}
        quantize_static(
            path,
            path,
            Reader(feeds[layer_number - 1], names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    manifest.precision = "int8"
    manifest.write(directory)


def _row(name: str, model: Any, encoded: Sequence[Encoded], labels: list[int], pad_id: int) -> dict[str, Any]:
    probabilities, entropies = all_layer_outputs(model, encoded, pad_id, batch_size=32, progress=False)
    per_layer = per_layer_accuracy(probabilities, labels)
    # Dynamic quantization scales activations per call over the whole batch: the same sentences in other
    # batches can get other answers. Full depth alone and in batches of 64 (length-sorted, as calibrate runs).
    by_batch = {32: per_layer[-1]}
    for batch_size in BATCH_SIZES:
        if batch_size not in by_batch:
            others, _ = all_layer_outputs(model, encoded, pad_id, batch_size=batch_size, progress=False)
            by_batch[batch_size] = per_layer_accuracy(others[-1:], labels)[0]
    presets = {p.name: p for p in calibrate(probabilities, entropies, labels, criterion=model.config.criterion)}
    balanced = presets.get("balanced")
    return {
        "try": name,
        "per_layer_accuracy": per_layer,
        "full_depth_accuracy": per_layer[-1],
        "balanced_threshold": balanced.threshold if balanced else None,
        "balanced_accuracy": balanced.accuracy if balanced else None,
        "balanced_expected_saving": balanced.expected_saving if balanced else None,
        "full_depth_accuracy_by_batch_size": {str(size): by_batch[size] for size in BATCH_SIZES},
    }


def _spread(values: Iterable[float]) -> float:
    numbers = list(values)
    return max(numbers) - min(numbers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--calibration", default="../shared/data/sst2/train.tsv", help="texts for static ranges")
    parser.add_argument("--calibration-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="loadtest/results/int8")
    args = parser.parse_args(argv)
    started = time.time()
    base = load_model(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    pad_id = int(tokenizer.pad_token_id or 0)
    data = read_dataset(args.data, label_names=base.config.labels)
    assert data.labels is not None
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, base.config.max_length)
    train = read_dataset(args.calibration, label_names=base.config.labels)
    picked = random.Random(0).sample(range(len(train)), min(args.calibration_rows, len(train)))
    calibration = tokenize(tokenizer, [train.texts[i] for i in picked], None, base.config.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        export_graphs(base, Path(scratch) / "fp32-graphs", "fp32")
        _static(base, Path(scratch) / "fp32-graphs", Path(scratch) / "static", calibration, pad_id)
        fp32 = export(base, Path(scratch) / "fp32", "fp32", threads=args.threads)
        rows.append(_row("fp32 (reference)", fp32, encoded, data.labels, pad_id))
        for number, (name, settings) in enumerate(DYNAMIC_TRIES.items()):
            exported = export(base, Path(scratch) / f"int8-{number}", "int8", quantization=settings)
            rows.append(_row(name, exported, encoded, data.labels, pad_id))
            print(rows[-1], flush=True)
        static = OnnxDeeBert(base.config, Path(scratch) / "static", Manifest.read(Path(scratch) / "static"), None)
        rows.append(_row(STATIC_TRY, static, encoded, data.labels, pad_id))
    reference = rows[0]["full_depth_accuracy"]
    for row in rows:
        row["full_depth_vs_fp32_points"] = 100 * (row["full_depth_accuracy"] - reference)
        if row["balanced_accuracy"] is not None:
            row["balanced_vs_fp32_full_points"] = 100 * (row["balanced_accuracy"] - reference)
            row["default_bar_met"] = row["balanced_vs_fp32_full_points"] >= -0.5
    command = "python -m benchmarks.int8_tries " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_description(),
        "elapsed_s": time.time() - started,
        "calibration_rows": len(calibration),
        "tries": rows,
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "int8_tries.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(
        ["quantization", "full depth %", "vs fp32", "balanced %", "vs fp32 full depth", "saving", "per layer %"],
        [
            [
                r["try"],
                f"{100 * r['full_depth_accuracy']:.2f}",
                f"{r['full_depth_vs_fp32_points']:+.2f}",
                f"{100 * r['balanced_accuracy']:.2f}" if r["balanced_accuracy"] is not None else "-",
                f"{r.get('balanced_vs_fp32_full_points', 0):+.2f}",
                f"{100 * r['balanced_expected_saving']:.1f}%" if r["balanced_expected_saving"] is not None else "-",
                " ".join(f"{100 * a:.1f}" for a in r["per_layer_accuracy"]),
            ]
            for r in rows
        ],
    )
    by_batch_table = markdown_table(
        ["quantization", *(f"full depth %, batches of {size}" for size in BATCH_SIZES), "spread (points)"],
        [
            [
                r["try"],
                *(f"{100 * r['full_depth_accuracy_by_batch_size'][str(size)]:.2f}" for size in BATCH_SIZES),
                f"{100 * _spread(r['full_depth_accuracy_by_batch_size'].values()):.2f}",
            ]
            for r in rows
        ],
    )
    text = "\n".join(
        [
            f"`{command}`",
            "",
            describe_machine(results["machine"]),
            "",
            *table,
            "",
            "The same sentences at full depth in batches of other sizes (length-sorted; 1 = each sentence alone):",
            "",
            *by_batch_table,
            "",
        ]
    )
    (output / "int8_tries.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
