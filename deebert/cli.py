"""The `deebert` command: train, calibrate, evaluate, results, export, serve, loadtest, bench, reliability.

This module only parses arguments and hands over to `model/`, `server/` and `loadtest/`; it holds no logic
of its own, so each package stays usable on its own.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from reports.common import describe_machine, machine_description, markdown_table, percent
from reports.terminal import table

DEFAULT_CHECKPOINT = "weights/sst2-minilm-l6"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # model.device.DTYPES, without importing torch to parse


def _csv_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _add_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from model.train import SCHEMES, TrainSettings

    defaults = TrainSettings(base="", train_file="", output="")
    p = subparsers.add_parser(
        "train",
        help="DeeBERT fine-tuning (two-stage by default)",
        description="DeeBERT fine-tuning: the paper's two stages by default, or a later scheme (--scheme).",
    )
    p.add_argument("--base", required=True, help="plain BERT/RoBERTa checkpoint directory (or hub id)")
    p.add_argument("--train", dest="train_file", required=True, help="training data (TSV/CSV/JSONL)")
    p.add_argument("--dev", dest="dev_file", help="dev data: per-layer accuracy after each stage")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--scheme",
        choices=SCHEMES,
        default=defaults.scheme,
        help="two-stage (paper), joint, weighted-joint (PABEE), distill (FastBERT), alternating (BERxiT)",
    )
    p.add_argument("--label-names", type=_csv_list, help="names for integer labels 0..k-1, comma-separated")
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="a set of labels per text (the label column: comma-separated names or ids, or a JSON list): one "
        "sigmoid per label, binary cross-entropy, and the label-entropy exit rule",
    )
    p.add_argument("--text-columns", type=_csv_list, help="text column(s), e.g. sentence1,sentence2")
    p.add_argument("--pooling", choices=["first", "mean"], default=defaults.pooling, help="off-ramp pooling")
    p.add_argument("--off-ramp-dropout", type=float, default=defaults.off_ramp_dropout)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--epochs", dest="stage1_epochs", type=int, default=defaults.stage1_epochs, help="stage-1 epochs")
    p.add_argument("--lr", dest="stage1_lr", type=float, default=defaults.stage1_lr, help="stage-1 learning rate")
    p.add_argument("--stage2-epochs", type=int, default=defaults.stage2_epochs)
    p.add_argument("--stage2-lr", type=float, default=defaults.stage2_lr)
    p.add_argument("--stage2-batch-size", type=int, default=defaults.stage2_batch_size)
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision, help="stage-1 autocast")
    p.add_argument("--save-dtype", choices=["float16", "float32"], default=defaults.save_dtype)
    p.add_argument("--max-train-samples", type=int, help="train on a random subset of this size")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_convert(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from model.convert import ConvertSettings

    defaults = ConvertSettings(classifier="", texts="", output="")
    p = subparsers.add_parser(
        "convert",
        help="turn a fine-tuned Hugging Face sequence classifier into an early-exit model (labels optional)",
        description="Keep a fine-tuned *ForSequenceClassification model's encoder and head unchanged (the head is the "
        "final off-ramp) and train off-ramps after layers 1..n-1 on your texts: from the head's own outputs "
        "(default, no labels) or from labels. Presets are calibrated by agreement with full depth.",
    )
    p.add_argument("--classifier", required=True, help="fine-tuned classifier directory (or hub id)")
    p.add_argument("--texts", required=True, help="in-domain texts: one per line, or TSV/CSV/JSONL with a text column")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--objective",
        choices=["distill", "labels", "mixed"],
        default=defaults.objective,
        help="distill: learn the classifier's own outputs (no labels); labels: the texts' labels; mixed: both",
    )
    p.add_argument(
        "--calibrate-by",
        choices=["agreement", "accuracy"],
        default=defaults.calibrate_by,
        help="presets by agreement with full depth on held-out texts (default, no labels needed), or by held-out "
        "accuracy (labelled texts the classifier never saw; on its own training texts accuracy flatters early exits)",
    )
    p.add_argument(
        "--text-columns", type=_csv_list, help="text column(s) of a TSV/CSV/JSONL file, e.g. question,answer"
    )
    p.add_argument("--label-column", default=defaults.label_column)
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="max tokens per text")
    p.add_argument("--max-texts", type=int, help="use a random subset of this many texts")
    p.add_argument("--held-out", type=float, default=defaults.held_out, help="share of texts kept to calibrate")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="off-ramp training epochs")
    p.add_argument("--lr", type=float, default=defaults.lr, help="off-ramp learning rate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, help="CPU threads of torch")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_convert(args: argparse.Namespace) -> int:
    from dataclasses import fields

    import torch

    from model.convert import ConvertError, ConvertSettings, convert

    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(ConvertSettings)}
    settings = ConvertSettings(**{k: v for k, v in vars(args).items() if k in names})
    try:
        log = convert(settings)
    except ConvertError as err:
        print(f"deebert convert: error: {err}", file=sys.stderr)
        return 2
    summary = {
        "output": settings.output,
        "full_depth_max_logit_difference": log.full_depth_max_logit_difference,
        "per_layer_agreement_with_full_depth": log.per_layer_agreement_with_full_depth,
        "presets": log.presets,
        "seconds": round(log.seconds, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("evaluate", help="per-layer accuracy, threshold sweep, timing and figures")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", required=True, help="labelled data (TSV/CSV/JSONL)")
    p.add_argument("--output", default="runs/evaluate", help="folder for report.json, sweep.csv and figures")
    p.add_argument("--thresholds", type=_csv_list, help="comma-separated thresholds or preset names (default: a grid)")
    _add_criterion(p, "exit rule to sweep (default: the checkpoint's; its presets are reported only for that one)")
    p.add_argument("--timing-samples", type=int, default=1000, help="samples timed at batch 1 (0: no timing)")
    p.add_argument(
        "--timing-repeats", type=int, default=3, help="runs of each variant per sample; the fastest counts (3)"
    )
    p.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    p.add_argument("--threads", type=int, help="CPU threads of torch or ONNX Runtime")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (DEEBERT_DEVICE)"
    )
    _add_backend(p)
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="compute dtype; auto = float16 on CUDA, float32 on CPU (DEEBERT_DTYPE)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_calibrate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("calibrate", help="choose preset thresholds on a dev set and store them")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", required=True, help="labelled dev data")
    _add_criterion(p, "exit rule to calibrate and store as the checkpoint's (default: the checkpoint's)")
    _add_backend(p, "int8, int8-static and bf16 store presets of their own, served whenever the checkpoint runs so")
    p.add_argument(
        "--calibration-data",
        help="int8-static: first measure the activation ranges on these texts (TSV/CSV/JSONL; labels not needed) "
        "and store them in the checkpoint, so that serve builds the int8 graphs without this data",
    )
    p.add_argument("--calibration-rows", type=int, default=300, help="texts of --calibration-data used (seeded)")
    p.add_argument(
        "--quantize",
        choices=["ffn", "all"],
        default="ffn",
        help="int8-static: the feed-forward products (default) or every product with a weight",
    )
    p.add_argument("--threads", type=int, help="CPU threads of torch or ONNX Runtime")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_backend(parser: argparse.ArgumentParser, precision_note: str = "") -> None:
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        default="auto",
        help="auto = the runtime deebert tune chose on this CPU, else onnxruntime on the CPU in float32 when "
        "installed, else torch (DEEBERT_BACKEND)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8", "int8-static"],
        default="fp32",
        help="onnxruntime: fp32, int8 (dynamic) or int8-static; openvino: fp32, bf16 or int8-static "
        + (f"({precision_note})" if precision_note else ""),
    )
    parser.add_argument(
        "--cache-dir", help="where ONNX graphs are cached (DEEBERT_CACHE_DIR; default ~/.cache/deebert)"
    )


def _add_classify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify every text of a file (TSV/CSV/JSONL) into JSON lines, early exit refilled in batches",
        description="Offline bulk classification: the texts sorted by length, in batches whose calls are "
        "refilled between layers (rows that leave free their places for rows of later batches), one JSON line "
        "per text in input order, as the server answers it. Labels in the file, if any, are scored.",
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--input", required=True, help="texts (TSV/CSV/JSONL with the checkpoint's text columns)")
    p.add_argument("--output", required=True, help="JSON lines, one per text: label, score, exit layer, entropy")
    p.add_argument("--threshold", default="balanced", help="a number or preset name (default: balanced)")
    p.add_argument("--batch-size", type=int, default=32, help="most rows in one runtime call (32)")
    p.add_argument("--threads", type=int, help="CPU threads of the runtime (default: its own)")
    _add_backend(p)
    p.add_argument("--summary", help="also write the run's summary (counts, speed, saving, accuracy) as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_classify(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from model.bulk import classify_all
    from model.checkpoint import require_deebert, resolve_directory
    from model.config import ConfigError
    from model.data import read_dataset
    from model.exit_rule import LABEL_ON_PROBABILITY
    from model.tokenization import load_tokenizer, tokenize
    from model.tune import load_auto

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    # Which runtime `auto` took, and why (or how to tune), on stderr beside the progress bar.
    project_log = logging.getLogger("deebert")
    if not project_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("deebert classify: %(message)s"))
        project_log.addHandler(handler)
        project_log.setLevel(logging.INFO)
    directory = resolve_directory(args.checkpoint)
    require_deebert(directory, args.checkpoint)
    if args.backend == "auto":  # as `deebert serve` runs it: the runtime `deebert tune` chose on this CPU
        model, _, reason = load_auto(directory, args.cache_dir, args.threads, args.batch_size, budget_s=0.0)
        tokenizer = load_tokenizer(directory)
    else:
        model, tokenizer = _load(args)
        reason = "requested"
    config = model.config
    try:
        threshold, preset = config.resolve_threshold(args.threshold)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"--threshold: {err}") from None
    data = read_dataset(args.input, label_names=config.labels, text_columns=config.text_columns, require_labels=False)
    _check_pairs(config, data, args.input)
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, config.max_length)
    with tqdm(total=len(encoded), desc="classify", unit="text", disable=not args.progress) as bar:
        run = classify_all(model, encoded, threshold, tokenizer.pad_token_id, args.batch_size, bar.update)
    multi_label = config.criterion.multi_label
    with Path(args.output).open("w", encoding="utf-8") as out:
        for answer in run.answers:
            record: dict[str, object] = {
                "label": config.labels[answer.label_id],
                "label_id": answer.label_id,
                "score": max(answer.probabilities),
                "exit_layer": answer.exit_layer,
                "entropy": answer.entropy,
                "probabilities": dict(zip(config.labels, answer.probabilities, strict=True)),
            }
            if multi_label:
                on = zip(config.labels, answer.probabilities, strict=True)
                record["labels_on"] = [name for name, p in on if p >= LABEL_ON_PROBABILITY]
            out.write(json.dumps(record) + "\n")
    summary: dict[str, object] = {
        "command": args.command_line,
        "machine": machine_description(),
        "checkpoint": str(args.checkpoint),
        "input": str(args.input),
        "texts": len(run.answers),
        "backend": model.backend,
        "precision": model.precision,
        "backend_reason": reason,
        "threshold": threshold,
        "preset": preset,
        "batch_size": args.batch_size,
        "seconds": run.seconds,
        "texts_per_s": run.texts_per_s,
        "exit_counts": run.exit_counts,
        "expected_saving": run.expected_saving,
    }
    if data.labels is not None and not multi_label:
        correct = sum(answer.label_id == gold for answer, gold in zip(run.answers, data.labels, strict=True))
        summary["accuracy"] = correct / len(data.labels)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    saving = run.expected_saving
    accuracy = f", accuracy {percent(summary['accuracy'])}" if "accuracy" in summary else ""  # type: ignore[arg-type]
    print(
        f"{len(run.answers)} texts in {run.seconds:.2f} s ({run.texts_per_s:.0f}/s) on {model.backend} "
        f"{model.precision} at {preset or threshold}; exits by layer {run.exit_counts}, expected saving "
        f"{percent(saving)}{accuracy}; wrote {args.output}",
        file=sys.stderr,
    )
    return 0


def _add_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX Runtime step graphs (serve does this on first start)",
        description="Export the step graphs of the ONNX Runtime backend, with a manifest: opset, versions, "
        "fusions, quantization, parity against PyTorch. Without --output they go to the cache serve reads.",
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--precision", choices=["fp32", "int8", "int8-static"], default="fp32")
    p.add_argument("--output", help="directory to write (default: the cache entry for this checkpoint)")
    p.add_argument("--cache-dir", help="the cache (DEEBERT_CACHE_DIR; default ~/.cache/deebert)")
    p.add_argument(
        "--quantize",
        choices=["ffn", "all"],
        default="ffn",
        help="int8: the feed-forward products only (default), or every encoder MatMul",
    )
    p.add_argument(
        "--weight-scales",
        choices=["per-channel", "per-tensor"],
        default="per-channel",
        help="int8: one weight scale per output channel (default) or per tensor",
    )


def _add_tune(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from model.tokenization import DEFAULT_SPLIT_TOKENS
    from model.tune import OBJECTIVES

    p = subparsers.add_parser(
        "tune",
        help="measure every runtime and precision this machine can run; serve --backend auto uses the fastest",
        description="Measure torch fp32/bf16, ONNX Runtime fp32/int8 and OpenVINO fp32/bf16 on the checkpoint's "
        "tune sample (batch 1 and --max-batch-size, at balanced), reject any whose answers drift from fp32's, and "
        "cache the fastest eligible one for this CPU, these weights and these runtime versions.",
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--cache-dir", help="the cache (DEEBERT_CACHE_DIR; default ~/.cache/deebert)")
    p.add_argument("--threads", type=int, help="CPU threads of each runtime (DEEBERT_THREADS; default theirs)")
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="the server's max batch size (DEEBERT_MAX_BATCH_SIZE)"
    )
    p.add_argument(
        "--batch-split-tokens",
        type=int,
        default=None,
        help="the server's DEEBERT_BATCH_SPLIT_TOKENS: batches are timed as the server runs texts that arrive one "
        "per request, in the sample's order and split into calls over texts of like length (default: as the "
        f"server splits for each runtime, {DEFAULT_SPLIT_TOKENS} tokens a call, whole for packed layers)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="split",
        help="split: the fastest alone for batches of one and the fastest in batches for the rest (default); "
        "or one runtime by batch-1 latency, throughput, or both (mixed)",
    )
    p.add_argument(
        "--write-sample",
        metavar="DATA",
        help="first write the checkpoint's tune sample from this data file (TSV/CSV/JSONL; labels used if present)",
    )
    p.add_argument("--sample-size", type=int, default=400, help="rows of --write-sample's data (seeded)")
    p.add_argument("--batch1-rows", type=int, default=100, help="texts timed one at a time")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after a warm-up round (best kept)")
    p.add_argument("--output-json", help="also write the tune's table and choice here")
    p.add_argument("--output-md", help="also write the table as a markdown section (machine, command, table)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_tune(args: argparse.Namespace) -> int:
    from model.checkpoint import load_model, resolve_directory
    from model.config import ConfigError
    from model.data import read_dataset
    from model.onnx_backend import default_cache_dir
    from model.tokenization import load_tokenizer
    from model.tune import (
        CLOSE_CALL,
        CLOSE_CALL_BATCHED_TEXTS,
        CLOSE_CALL_ROUNDS,
        CLOSE_CALL_TEXTS,
        TABLE_HEADER,
        Timing,
        describe_split,
        make_sample,
        run_tune,
        table_rows,
    )

    directory = resolve_directory(args.checkpoint)
    if args.write_sample:
        model = load_model(directory).eval()
        dataset = read_dataset(args.write_sample, label_names=model.config.labels, require_labels=False)
        sample = make_sample(model, load_tokenizer(directory), dataset, args.sample_size)
        print(f"wrote {sample.write(directory)} ({len(sample)} rows, labels {'yes' if sample.labels else 'no'})")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.batch_split_tokens is not None and args.batch_split_tokens < 0:
        raise ConfigError(f"--batch-split-tokens must be 0 or more, got {args.batch_split_tokens}")
    timing = Timing(
        batch1_rows=args.batch1_rows,
        batch_size=args.max_batch_size,
        rounds=args.rounds,
        split_tokens=args.batch_split_tokens,
    )
    result = run_tune(directory, cache_dir, args.threads, args.objective, timing, progress=args.progress)
    where = f"{result.fingerprint['cpu']}, {result.fingerprint['cpus']} CPUs"
    print(f"{where}; sample: {result.sample}; {result.seconds:.0f} s")
    print(table(TABLE_HEADER, table_rows(result), align="<>>>>>><"))
    print(f"chosen: {result.choice or 'none'} — {result.reason()}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if args.output_md:
        lines = [
            "## Runtime chosen by measurement (`deebert tune`)",
            "",
            f"{describe_machine(machine_description())}.",
            "",
            f"`{args.command_line}`, {result.seconds:.0f} s, sample: {result.sample}. Batch-1 ms: mean over "
            f"{args.batch1_rows} texts alone; batched: texts/s in batches of {args.max_batch_size} in the sample's "
            f"order, each split into calls over texts of like length ({describe_split(args.batch_split_tokens)}; "
            "as the server runs texts arriving one per request); both at each "
            "runtime's `balanced`, the best of the timed rounds after a warm-up round; `(side by side)`: the two "
            f"fastest eligible at batch 1, within {(CLOSE_CALL - 1) * 100:.0f} %, timed again on {CLOSE_CALL_TEXTS} "
            f"texts alone, each text's fastest of {CLOSE_CALL_ROUNDS} alternating passes, and likewise the two "
            f"fastest eligible in batches on {CLOSE_CALL_BATCHED_TEXTS} texts, each call's fastest pass. Agreement: "
            "labels equal to fp32's at `balanced`; accuracy against the sample's labels. `1` serves batches of one, "
            "`B` batches (`*` a single runtime).",
            "",
            *markdown_table(TABLE_HEADER, table_rows(result)),
            "",
            f"Chosen: {result.reason()}.",
            "",
        ]
        Path(args.output_md).write_text("\n".join(lines))
    return 0 if result.choice else 1


def _add_criterion(parser: argparse.ArgumentParser, help_text: str) -> None:
    from model.exit_rule import CRITERIA

    parser.add_argument("--criterion", choices=list(CRITERIA), help=help_text)


def _config_for(config, criterion: str | None):  # type: ignore[no-untyped-def]
    """A config, or a copy switched to another exit criterion (whose presets do not carry over)."""
    if criterion is None or criterion == config.exit_criterion:
        return config
    return config.with_presets([], exit_criterion=criterion)


def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from model.train import TrainSettings, train

    names = {f.name for f in fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in names})
    log = train(settings)
    print(
        json.dumps(
            {
                "output": settings.output,
                "dev_per_layer_accuracy": log.dev_per_layer_accuracy,
                "stage1_seconds": log.stage1["seconds"],
                "total_seconds": log.total_seconds,
            },
            indent=2,
        )
    )
    return 0


def _load(args: argparse.Namespace, device: str = "cpu", dtype: str = "float32"):  # type: ignore[no-untyped-def]
    """The checkpoint on the device, dtype and backend the arguments ask for, and its tokenizer."""
    from model.backends import load_backend, pick_backend
    from model.checkpoint import load_model
    from model.device import pick_device, pick_dtype, prepare
    from model.tokenization import load_tokenizer

    target = pick_device(device)
    prepare(target)
    precision = args.precision
    if args.backend == "torch" and precision == "bf16":  # torch's precision is its dtype
        dtype, precision = "bfloat16", "fp32"
    torch_dtype = pick_dtype(dtype, target)
    backend = pick_backend(args.backend, target, torch_dtype)
    model = load_model(args.checkpoint, dtype=torch_dtype).to(target)
    return load_backend(model, backend, precision, args.cache_dir, args.threads), load_tokenizer(args.checkpoint)


def _check_pairs(config, data, path: str) -> None:  # type: ignore[no-untyped-def]
    """DataError unless the file's texts are what the model classifies: sentence pairs or single sentences."""
    from model.data import DataError

    if config.is_pair_task != (data.text_pairs is not None):
        kind = "sentence pairs" if config.is_pair_task else "single sentences"
        raise DataError(f"{path}: the model classifies {kind}; the file's text columns are {data.text_columns}")


def _labelled(args: argparse.Namespace, model, tokenizer):  # type: ignore[no-untyped-def]
    from model.data import DataError, read_dataset
    from model.tokenization import tokenize

    multi_label = model.config.criterion.multi_label  # a set of labels per text
    data = read_dataset(args.data, label_names=model.config.labels, multi_label=multi_label)
    if getattr(args, "max_samples", None):
        data = data.subset(range(min(args.max_samples, len(data))))
    if not data.has_labels:
        raise DataError(f"{args.data} has no labels")
    _check_pairs(model.config, data, args.data)
    return data, tokenize(tokenizer, data.texts, data.text_pairs, model.config.max_length)


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from model.config import ConfigError
    from model.evaluate import evaluate
    from reports.evaluation import format_table, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args, args.device, args.dtype)
    config = _config_for(model.config, args.criterion)
    thresholds = None
    if args.thresholds:
        try:
            thresholds = [config.resolve_threshold(value)[0] for value in args.thresholds]
        except (KeyError, ValueError) as err:
            raise ConfigError(f"--thresholds: {err}") from None
    data, encoded = _labelled(args, model, tokenizer)
    report = evaluate(
        model,
        encoded,
        data.targets(),
        tokenizer.pad_token_id,
        thresholds,
        args.timing_samples,
        args.progress,
        criterion=config.criterion,
        timing_repeats=args.timing_repeats,
    )
    report["checkpoint"] = str(args.checkpoint)
    report["data"] = str(args.data)
    report["command"] = args.command_line
    report["machine"] = machine_description()
    write_report(report, Path(args.output))
    print(format_table(report))
    print(f"wrote {args.output}/report.json, sweep.csv and figures")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from model.backends import runtime_key
    from model.calibrate import calibrate
    from model.checkpoint import resolve_directory
    from model.config import DeeBertConfig
    from model.evaluate import all_layer_outputs

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.calibration_data:
        _store_int8_ranges(args)
    model, tokenizer = _load(args)
    data, encoded = _labelled(args, model, tokenizer)
    probabilities, entropies = all_layer_outputs(model, encoded, tokenizer.pad_token_id, progress=args.progress)
    directory = resolve_directory(args.checkpoint)
    stored = DeeBertConfig.load(directory)  # the file's own presets (the model's may be a runtime's)
    config = _config_for(model.config, args.criterion)
    # fp32 answers are the same on every backend (tested); other precisions keep presets of their own, held to
    # the fp32 model's full-depth accuracy.
    runtime = None if args.precision == "fp32" else runtime_key(model.backend, args.precision)
    targets = data.targets()
    reference = None if runtime is None else _fp32_full_depth_accuracy(directory, encoded, targets, tokenizer)
    presets = calibrate(probabilities, entropies, targets, criterion=config.criterion, reference_accuracy=reference)
    if runtime is None:
        stored = _config_for(stored, args.criterion).with_presets(presets, calibrated_by="accuracy")
    else:
        stored = stored.with_presets(presets, runtime=runtime)
    stored.save(directory)
    print(
        table(
            ["preset", "threshold", "dev accuracy", "expected saving"],
            [
                [p.name, f"{p.threshold:.6f}", percent(p.accuracy or 0, 2), percent(p.expected_saving or 0)]
                for p in presets
            ],
            align="<>>>",
        )
    )
    where = f" for {runtime}" if runtime else ""
    print(f"stored {len(presets)} {config.exit_criterion} presets{where} in {directory}/config.json")
    return 0


def _fp32_full_depth_accuracy(directory: Path, encoded, labels, tokenizer) -> float:  # type: ignore[no-untyped-def]
    """The fp32 model's full-depth accuracy on the calibration data (torch, batches of 64)."""
    import torch

    from model.checkpoint import load_model
    from model.sweep import correct
    from model.tokenization import pad_batch

    model = load_model(directory).eval()
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(encoded), 64):
            batch = pad_batch(encoded[start : start + 64], tokenizer.pad_token_id)
            logits = model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            probabilities.append(model.config.criterion.outputs(logits.unsqueeze(0))[0][0])
    return float(correct(torch.cat(probabilities), torch.tensor(labels)).float().mean())


def _store_int8_ranges(args: argparse.Namespace) -> None:
    """Measure static int8's activation ranges on --calibration-data and store them in the checkpoint."""
    import random

    from model.checkpoint import load_model, resolve_directory
    from model.config import DeeBertConfig
    from model.data import read_dataset
    from model.int8 import calibrate_ranges
    from model.tokenization import load_tokenizer, tokenize

    directory = resolve_directory(args.checkpoint)
    model = load_model(directory).eval()
    dataset = read_dataset(args.calibration_data, label_names=model.config.labels, require_labels=False)
    rows = sorted(random.Random(0).sample(range(len(dataset)), min(args.calibration_rows, len(dataset))))
    texts = [dataset.texts[r] for r in rows]
    pairs = [dataset.text_pairs[r] for r in rows] if dataset.text_pairs is not None else None
    encoded = tokenize(load_tokenizer(directory), texts, pairs, model.config.max_length)
    ranges = calibrate_ranges(model, encoded, ops=args.quantize, progress=args.progress)
    ranges["source"] = f"{Path(args.calibration_data).name}, {len(rows)} rows (seed 0)"
    stored = DeeBertConfig.load(directory)
    stored.int8_ranges = ranges
    stored.save(directory)
    print(f"stored int8 ranges of {len(ranges['ranges'])} matrix products ({ranges['source']}) in {directory}")


def _run_export(args: argparse.Namespace) -> int:
    import json as json_module

    from model.checkpoint import load_model
    from model.onnx_backend import cache_entry, default_cache_dir, export, graph_digest
    from model.onnx_export import ExportError, Quantization

    model = load_model(args.checkpoint)
    digest = graph_digest(model, args.precision)
    if args.output:
        directory = Path(args.output)
    else:
        directory = cache_entry(Path(args.cache_dir) if args.cache_dir else default_cache_dir(), digest, args.precision)
    quantization = Quantization(ops=args.quantize, per_channel=args.weight_scales == "per-channel")
    # Only the default quantization belongs in the cache serve reads: other settings are experiments.
    if args.precision == "int8" and quantization != Quantization() and not args.output:
        raise ExportError("--quantize/--weight-scales other than the defaults need --output")
    exported = export(model, directory, args.precision, quantization=quantization, digest=digest)
    manifest = exported.manifest
    print(
        json_module.dumps(
            {
                "output": str(directory),
                **{
                    k: getattr(manifest, k)
                    for k in (
                        "precision",
                        "opset",
                        "runtime",
                        "runtime_version",
                        "fusions",
                        "quantization",
                        "parity",
                        "seconds",
                    )
                },
            },
            indent=2,
        )
    )
    return 0


def _add_results(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "results", help="write docs/RESULTS.md from the reports of docs/reproduce.sh (tasks, schemes, criteria)"
    )
    p.add_argument("--root", default=".", help="repository root the report paths are relative to")
    p.add_argument("--output", default="docs/RESULTS.md")
    p.add_argument(
        "--discussion", default="docs/results/discussion.md", help="hand-written discussion appended if present"
    )


def _run_results(args: argparse.Namespace) -> int:
    from reports.results import write_results

    root = Path(args.root)
    discussion = Path(args.discussion)
    text = discussion.read_text() if discussion.is_file() else None
    summary = write_results(root, root / args.output, text)
    print(f"wrote {root / args.output} ({', '.join(summary) or 'no reports found'})")
    return 0


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.serve import add_arguments

    p = subparsers.add_parser("serve", help="serve a checkpoint over HTTP (default: the shipped SST-2 model)")
    add_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    from server.serve import run_from_args

    return run_from_args(args)


def _add_loadtest(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from loadtest.generator import add_arguments

    p = subparsers.add_parser("loadtest", help="open- or closed-loop load against a running server, with a report")
    add_arguments(p)


def _run_loadtest(args: argparse.Namespace) -> int:
    from loadtest.generator import run_from_args

    return run_from_args(args)


def _add_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from loadtest.bench import add_arguments

    p = subparsers.add_parser("bench", help="start servers, measure them, and regenerate BENCHMARKS.md")
    add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from loadtest.bench import run_from_args

    return run_from_args(args)


def _add_reliability(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from loadtest.reliability import add_arguments

    p = subparsers.add_parser(
        "reliability", help="overload (3x capacity) or soak (70%%) run on a server it starts; writes RELIABILITY.md"
    )
    add_arguments(p)


def _run_reliability(args: argparse.Namespace) -> int:
    from loadtest.reliability import run_from_args

    return run_from_args(args)


AddFlags = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
# Each subcommand: the function that adds its flags, and the one that runs it.
SUBCOMMANDS: dict[str, tuple[AddFlags, Callable[[argparse.Namespace], int]]] = {
    "train": (_add_train, _run_train),
    "convert": (_add_convert, _run_convert),
    "calibrate": (_add_calibrate, _run_calibrate),
    "evaluate": (_add_evaluate, _run_evaluate),
    "classify": (_add_classify, _run_classify),
    "results": (_add_results, _run_results),
    "export": (_add_export, _run_export),
    "serve": (_add_serve, _run_serve),
    "tune": (_add_tune, _run_tune),
    "loadtest": (_add_loadtest, _run_loadtest),
    "bench": (_add_bench, _run_bench),
    "reliability": (_add_reliability, _run_reliability),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `deebert` parser; with `only`, that subcommand's flags alone are built (the others by name), so a
    command imports only what it runs: `deebert serve` re-runs itself on jemalloc before torch is imported."""
    parser = argparse.ArgumentParser(prog="deebert", description="DeeBERT early-exit text classification.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_flags, _) in SUBCOMMANDS.items():
        if only is None or name == only:
            add_flags(subparsers)
        else:
            subparsers.add_parser(name)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The model package's errors that mean bad input or setup: one line, exit status 2, no traceback."""
    from model.backends import BackendError
    from model.checkpoint import CheckpointError
    from model.config import ConfigError
    from model.data import DataError
    from model.device import DeviceError
    from model.onnx_export import ExportError
    from model.tune import TuneError

    return (BackendError, CheckpointError, ConfigError, DataError, DeviceError, ExportError, TuneError)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    only = words[0] if words and words[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(words)
    args.command_line = shlex.join(["deebert", *words])  # recorded in reports
    try:
        return SUBCOMMANDS[args.command][1](args)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"deebert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
