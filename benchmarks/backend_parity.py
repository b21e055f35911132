"""Do the PyTorch and ONNX Runtime backends answer the same on a whole dev set, at every preset?

    python -m benchmarks.backend_parity --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv

For each threshold (full depth and every preset) every row runs through both backends' exit loops, in
length-sorted batches and alone (batch 1 takes its own path). A row whose exit layer differs is explained
when, at the layer where the two backends decided differently, its entropy on either backend lies within
`--tolerance` of the threshold (float error decides it, not the backend); any other difference is
unexplained. Writes a JSON report and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from model import exit_rule
from model.backends import load_backend
from model.checkpoint import load_model
from model.data import read_dataset
from model.tokenization import groups_by_length, load_tokenizer, pad_batch, tokenize
from reports.common import machine_description
from reports.terminal import table


def compare(
    checkpoint: str, data: str, precision: str, batch_size: int, tolerance: float, cache_dir: str | None
) -> dict[str, Any]:
    torch_model = load_model(checkpoint)
    onnx_model = load_backend(torch_model, "onnxruntime", precision, cache_dir)
    tokenizer = load_tokenizer(checkpoint)
    dataset = read_dataset(data, label_names=torch_model.config.labels)
    encoded = tokenize(tokenizer, dataset.texts, dataset.text_pairs, torch_model.config.max_length)
    thresholds = [("full depth", torch_model.config.criterion.full_depth)]
    thresholds += [(p.name, p.threshold) for p in onnx_model.config.presets]
    # Every off-ramp's entropy on both backends, to tell float-error differences from real ones.
    entropies: dict[str, torch.Tensor] = {}
    for name, model in (("torch", torch_model), ("onnxruntime", onnx_model)):
        rows = torch.empty(torch_model.num_layers, len(encoded))
        for chunk in groups_by_length(encoded, 64):
            batch = pad_batch([encoded[i] for i in chunk], tokenizer.pad_token_id)
            with torch.inference_mode():
                logits = model.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            rows[:, chunk] = exit_rule.entropy_from_logits(logits)[1]
        entropies[name] = rows
    results = []
    for name, threshold in thresholds:
        answers: dict[str, dict[str, list[int]]] = {}
        for backend, model in (("torch", torch_model), ("onnxruntime", onnx_model)):
            for mode in ("batched", "alone"):
                layers, labels = [0] * len(encoded), [0] * len(encoded)
                size = batch_size if mode == "batched" else 1
                for chunk in groups_by_length(encoded, size):
                    batch = pad_batch([encoded[i] for i in chunk], tokenizer.pad_token_id)
                    result = model.infer(
                        batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * len(chunk)
                    )
                    for position, row in enumerate(chunk):
                        layers[row], labels[row] = result.exit_layer[position], result.label[position]
                answers[f"{backend} {mode}"] = {"layers": layers, "labels": labels}
        for mode in ("batched", "alone"):
            reference, other = answers[f"torch {mode}"], answers[f"onnxruntime {mode}"]
            differing = [i for i in range(len(encoded)) if reference["layers"][i] != other["layers"][i]]
            explained = []
            for row in differing:
                deciding = min(reference["layers"][row], other["layers"][row]) - 1  # 0-based layer of the split
                near = [abs(float(entropies[b][deciding, row]) - threshold) for b in entropies]
                if min(near) <= tolerance:
                    explained.append(row)
            label_differences = sum(
                1 for i in range(len(encoded)) if reference["labels"][i] != other["labels"][i] and i not in differing
            )
            results.append(
                {
                    "threshold_name": name,
                    "threshold": threshold,
                    "mode": mode if mode == "alone" else f"batch {batch_size}",
                    "rows": len(encoded),
                    "exit_layer_differences": len(differing),
                    "explained_by_float_error": len(explained),
                    "unexplained": len(differing) - len(explained),
                    "label_differences_same_layer": label_differences,
                    "label_differences_total": sum(
                        1 for i in range(len(encoded)) if reference["labels"][i] != other["labels"][i]
                    ),
                }
            )
    difference = (entropies["torch"] - entropies["onnxruntime"]).abs()
    return {
        "checkpoint": checkpoint,
        "data": data,
        "precision": precision,
        "tolerance": tolerance,
        "max_entropy_difference": float(difference.max()),
        "machine": machine_description(),
        "command": "python -m benchmarks.backend_parity " + " ".join(sys.argv[1:]),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="entropy distance that float error explains")
    parser.add_argument("--cache-dir")
    parser.add_argument("--output", help="JSON report (default: print only)")
    args = parser.parse_args(argv)
    report = compare(args.checkpoint, args.data, args.precision, args.batch_size, args.tolerance, args.cache_dir)
    print(
        f"{report['checkpoint']} on {report['data']} ({report['precision']}): max |Δ entropy| "
        f"{report['max_entropy_difference']:.2g}"
    )
    columns = {
        "threshold_name": "threshold",
        "mode": "mode",
        "rows": "rows",
        "exit_layer_differences": "exit diff",
        "explained_by_float_error": "float err",
        "unexplained": "unexplained",
        "label_differences_total": "labels",
    }
    rows = [[str(r[key]) for key in columns] for r in report["results"]]
    print(table(list(columns.values()), rows, align="<<>>>>>"))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
