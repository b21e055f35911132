"""DeeBERT fine-tuning: the paper's two stages (default) and the schemes that followed it.

Schemes (`TrainSettings.scheme`):
- `two-stage` (DeeBERT, Xin et al. 2020): stage 1 fine-tunes the encoder and the final classifier; stage 2
  freezes all of that and trains the other off-ramps together on the sum of their cross-entropy losses.
- `joint`: encoder and every off-ramp trained together on the summed cross-entropy of all layers.
- `weighted-joint` (PABEE, Zhou et al. 2020): the same, layer i's loss weighted by i / Σ j.
- `distill` (FastBERT, Liu et al. 2020): stage 1 as two-stage; then, encoder and final classifier frozen,
  the other off-ramps learn the final classifier's distribution (summed KL divergence, no labels).
- `alternating` (BERxiT, Xin et al. 2021): epoch by epoch, alternate between the final layer's loss
  (odd epochs) and the summed loss of every off-ramp (even epochs), the encoder trained throughout.
Where the encoder is frozen (stage 2 of two-stage and distill), each layer's pooled output is fixed in eval
mode, so those features are computed once and the off-ramps train on them: many epochs cost seconds.
Multi-label data (`multi_label`: a set of labels per text) trains every loss as binary cross-entropy, one
sigmoid per label, and the checkpoint exits by the `label-entropy` rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from tqdm import tqdm

from model.checkpoint import load_model, resolve_directory, save_model
from model.data import Dataset, read_dataset
from model.evaluate import all_layer_outputs, per_layer_accuracy
from model.exit_rule import DEFAULT_CRITERION
from model.modeling import DeeBert, OffRamp
from model.sweep import Targets
from model.tokenization import Encoded, groups_by_length, load_tokenizer, pad_batch, tokenize

Precision = Literal["fp32", "bf16"]
Scheme = Literal["two-stage", "joint", "weighted-joint", "distill", "alternating"]
SCHEMES: tuple[str, ...] = ("two-stage", "joint", "weighted-joint", "distill", "alternating")


@dataclass
class TrainSettings:
    """Every knob of a training run; saved in the training log."""

    base: str
    train_file: str
    output: str
    scheme: Scheme = "two-stage"
    dev_file: str | None = None
    label_names: list[str] | None = None
    text_columns: list[str] | None = None
    # One sigmoid per label (a set of labels per text): binary cross-entropies, and the `label-entropy` exit rule.
    multi_label: bool = False
    pooling: str = "first"
    off_ramp_dropout: float = 0.1
    max_length: int = 128
    batch_size: int = 32
    stage1_epochs: int = 3
    stage1_lr: float = 5e-5
    stage2_epochs: int = 10
    stage2_lr: float = 1e-3
    stage2_batch_size: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42
    precision: Precision = "fp32"
    save_dtype: Literal["float16", "float32"] = "float16"
    max_train_samples: int | None = None
    name: str | None = None
    progress: bool = True


@dataclass
class TrainingLog:
    """What happened: losses, times, dev accuracy per layer after each stage."""

    settings: dict[str, Any]
    num_train_samples: int = 0
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    dev_per_layer_accuracy: dict[str, list[float]] = field(default_factory=dict)
    total_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_batches: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar-length samples: little padding, still random order.

    Samples are shuffled, cut into groups of `group_batches` batches, sorted by length inside a group and
    batched; then the batches are shuffled.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * group_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(precision: Precision) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def frozen_fingerprint(model: DeeBert) -> str:
    """A hash of the encoder and final classifier weights: stage 2 must leave it unchanged."""
    digest = hashlib.sha256()
    frozen = list(model.backbone.state_dict().items()) + list(model.final_classifier.state_dict().items())
    for key, value in frozen:
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stage2_parameters(model: DeeBert) -> Iterator[nn.Parameter]:
    for ramp in list(model.off_ramps)[:-1]:
        yield from ramp.parameters()


def _adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def layer_loss_weights(scheme: Scheme, epoch: int, num_layers: int) -> list[float]:
    """Per-layer cross-entropy weights of the encoder-training phase of `scheme` in `epoch` (0-based)."""
    final_only = [0.0] * (num_layers - 1) + [1.0]
    if scheme in ("two-stage", "distill"):
        return final_only
    if scheme == "joint":
        return [1.0] * num_layers
    if scheme == "weighted-joint":
        total = num_layers * (num_layers + 1) / 2
        return [layer / total for layer in range(1, num_layers + 1)]
    if scheme == "alternating":
        return final_only if epoch % 2 == 0 else [1.0] * num_layers
    raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def _target_tensor(labels: Targets) -> tuple[torch.Tensor, nn.Module]:
    """Labels as a tensor with their loss: label ids and cross-entropy, or multi-hot rows and binary
    cross-entropy (one sigmoid per label)."""
    target = torch.tensor(labels)
    if target.dim() == 2:
        return target.float(), nn.BCEWithLogitsLoss()
    return target.long(), nn.CrossEntropyLoss()


def train_stage1(
    model: DeeBert,
    encoded: Sequence[Encoded],
    labels: Targets,
    settings: TrainSettings,
    pad_id: int,
    dev_accuracy: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Fine-tune the encoder with the scheme's per-layer losses (two-stage: encoder + final classifier on the
    final layer's cross-entropy; the other off-ramps stay untouched).

    `dev_accuracy`, when given, is called after each epoch (final-layer dev accuracy for the log).
    """
    n = model.num_layers
    weights_by_epoch = [layer_loss_weights(settings.scheme, e, n) for e in range(settings.stage1_epochs)]
    trained_ramps = [i for i in range(n) if any(w[i] > 0 for w in weights_by_epoch)]
    params = list(model.backbone.parameters())
    for i in trained_ramps:
        params.extend(model.off_ramps[i].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = _adamw(params, settings.stage1_lr, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    lengths = [len(e) for e in encoded]
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = steps_per_epoch * settings.stage1_epochs
    scheduler = linear_warmup_decay(optimizer, int(settings.warmup_ratio * total), total)
    label_tensor, loss_fn = _target_tensor(labels)
    epoch_losses: list[float] = []
    curve: list[dict[str, float]] = []
    dev_by_epoch: list[float] = []
    started = time.perf_counter()
    model.train()
    step = 0
    for epoch in range(settings.stage1_epochs):
        weights = weights_by_epoch[epoch]
        final_only = all(w == 0 for w in weights[:-1])
        batches = length_grouped_batches(lengths, settings.batch_size, generator)
        running = 0.0
        bar = tqdm(batches, desc=f"encoder epoch {epoch + 1}/{settings.stage1_epochs}", disable=not settings.progress)
        for index, rows in enumerate(bar, start=1):
            batch = pad_batch([encoded[i] for i in rows], pad_id)
            target = label_tensor[rows]
            with autocast(settings.precision):
                logits = model(batch.input_ids, batch.attention_mask, batch.token_type_ids, only_final=final_only)
            if final_only:
                loss = loss_fn(logits[0].float(), target)
            else:
                pairs = zip(weights, logits, strict=True)
                loss = sum((w * loss_fn(out.float(), target) for w, out in pairs if w), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running += loss.item()
            if step % 50 == 0:
                curve.append({"step": step, "loss": running / index})
                bar.set_postfix(loss=f"{running / index:.4f}")
        epoch_losses.append(running / max(1, len(batches)))
        if dev_accuracy is not None:
            model.eval()
            dev_by_epoch.append(dev_accuracy())
            model.train()
    model.eval()
    return {
        "dev_final_layer_accuracy_by_epoch": dev_by_epoch,
        "epochs": settings.stage1_epochs,
        "steps": step,
        "seconds": time.perf_counter() - started,
        "epoch_loss": epoch_losses,
        "loss_curve": curve,
        "layer_loss_weights_by_epoch": weights_by_epoch,
    }


@torch.no_grad()
def extract_features(
    model: DeeBert, encoded: Sequence[Encoded], pad_id: int, batch_size: int, progress: bool, last: bool = False
) -> torch.Tensor:
    """Pooled outputs of layers 1..n-1 (1..n with `last`) for every sample, [layers, samples, hidden],
    in eval mode (fp32)."""
    model.eval()
    kept = model.num_layers if last else model.num_layers - 1
    features = torch.empty(kept, len(encoded), model.config.hidden_size)
    for rows in tqdm(groups_by_length(encoded, batch_size), desc="stage 2 features", disable=not progress):
        batch = pad_batch([encoded[i] for i in rows], pad_id)
        pooled = model.pooled_features(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        features[:, rows] = pooled[:kept].float()
    return features


def train_stage2(
    model: DeeBert,
    features: torch.Tensor,
    labels: Targets,
    settings: TrainSettings,
    teacher_logits: torch.Tensor | None = None,
    multi_label: bool = False,
    with_labels: bool = False,
) -> dict[str, Any]:
    """Train off-ramps 1..n-1, encoder and final classifier frozen, on `features` [n-1, samples, hidden]:
    the sum of their cross-entropies against the labels (binary ones against multi-hot labels), or, given the
    final classifier's `teacher_logits` [samples, labels] (distill), the sum of their KL divergences from its
    distribution (`multi_label`: of their binary cross-entropies against its per-label sigmoids); with
    `with_labels` too, each off-ramp's cross-entropy against the labels is added to its KL divergence."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(stage2_parameters(model))
    for p in params:
        p.requires_grad_(True)
    ramps = cast(list[OffRamp], list(model.off_ramps)[:-1])
    optimizer = _adamw(params, settings.stage2_lr, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    num_samples = features.shape[1]
    steps_per_epoch = math.ceil(num_samples / settings.stage2_batch_size)
    total = steps_per_epoch * settings.stage2_epochs
    scheduler = linear_warmup_decay(optimizer, int(settings.warmup_ratio * total), total)
    label_tensor, loss_fn = _target_tensor(labels)
    epoch_losses: list[float] = []
    started = time.perf_counter()
    for ramp in ramps:
        ramp.train()
    bar = tqdm(range(settings.stage2_epochs), desc="stage 2 epochs", disable=not settings.progress)
    for _ in bar:
        order = torch.randperm(num_samples, generator=generator)
        running = 0.0
        for start in range(0, num_samples, settings.stage2_batch_size):
            rows = order[start : start + settings.stage2_batch_size]
            logits = [ramp.classify(features[i, rows]) for i, ramp in enumerate(ramps)]  # once per step
            if teacher_logits is None:
                target = label_tensor[rows]
                losses = (loss_fn(each, target) for each in logits)
            elif multi_label:
                soft = torch.sigmoid(teacher_logits[rows])
                losses = (nn.functional.binary_cross_entropy_with_logits(each, soft) for each in logits)
            else:
                teacher = torch.log_softmax(teacher_logits[rows], dim=-1)
                losses = (
                    nn.functional.kl_div(
                        torch.log_softmax(each, dim=-1), teacher, reduction="batchmean", log_target=True
                    )
                    for each in logits
                )
            loss = sum(losses, torch.zeros(()))
            if teacher_logits is not None and with_labels:
                target = label_tensor[rows]
                loss = loss + sum((loss_fn(each, target) for each in logits), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
        epoch_losses.append(running / steps_per_epoch)
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "epochs": settings.stage2_epochs,
        "steps": total,
        "seconds": time.perf_counter() - started,
        "epoch_loss_sum_over_ramps": epoch_losses,
        "objective": ("binary-cross-entropy" if label_tensor.dim() == 2 else "cross-entropy")
        if teacher_logits is None
        else ("bce-from-final-sigmoids" if multi_label else "kl-from-final-classifier")
        + ("+cross-entropy" if with_labels else ""),
    }


def _dev_accuracy(model: DeeBert, dev: Dataset, tokenizer: Any, settings: TrainSettings) -> list[float]:
    """Per-layer dev accuracy (multi-label: subset accuracy, every label right)."""
    encoded = tokenize(tokenizer, dev.texts, dev.text_pairs, settings.max_length)
    probabilities, _ = all_layer_outputs(model, encoded, tokenizer.pad_token_id, progress=False)
    return per_layer_accuracy(probabilities, dev.targets())


def train(settings: TrainSettings) -> TrainingLog:
    """Train with `settings.scheme`; write the checkpoint plus `training_log.json` into `settings.output`."""
    if settings.scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {settings.scheme!r} (known: {', '.join(SCHEMES)})")
    started = time.perf_counter()
    seed_everything(settings.seed)
    log = TrainingLog(settings=asdict(settings))
    data = read_dataset(
        settings.train_file,
        label_names=settings.label_names,
        text_columns=settings.text_columns,
        multi_label=settings.multi_label,
    )
    if settings.max_train_samples is not None and settings.max_train_samples < len(data):
        picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))
        data = data.subset(sorted(picked[: settings.max_train_samples].tolist()))
    label_names = settings.label_names or data.label_names
    dev = None
    if settings.dev_file:
        dev = read_dataset(
            settings.dev_file, label_names=label_names, text_columns=data.text_columns, multi_label=settings.multi_label
        )
    base = resolve_directory(settings.base)  # once: a hub id would otherwise be resolved twice
    tokenizer = load_tokenizer(base)
    model = load_model(
        base,
        base_model=settings.base,
        labels=label_names,
        pooling=settings.pooling,
        off_ramp_dropout=settings.off_ramp_dropout,
        max_length=settings.max_length,
        text_columns=data.text_columns,
        name=settings.name or Path(settings.output).name,
        exit_criterion="label-entropy" if settings.multi_label else DEFAULT_CRITERION,
    )
    seed_everything(settings.seed)
    model.off_ramps.apply(_init_off_ramp)
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, settings.max_length)
    labels = data.targets()
    log.num_train_samples = len(encoded)
    pad_id = int(tokenizer.pad_token_id)

    def final_dev_accuracy() -> float:
        assert dev is not None
        return _dev_accuracy(model, dev, tokenizer, settings)[-1]

    log.stage1 = train_stage1(model, encoded, labels, settings, pad_id, final_dev_accuracy if dev is not None else None)
    if dev is not None:
        log.dev_per_layer_accuracy["after_stage1"] = _dev_accuracy(model, dev, tokenizer, settings)

    if settings.scheme in ("two-stage", "distill"):
        before = frozen_fingerprint(model)
        feature_started = time.perf_counter()
        distill = settings.scheme == "distill"
        features = extract_features(model, encoded, pad_id, batch_size=128, progress=settings.progress, last=distill)
        teacher = None
        if distill:
            with torch.no_grad():
                teacher = model.final_classifier.classify(features[-1])
            features = features[:-1]
        feature_seconds = time.perf_counter() - feature_started
        log.stage2 = train_stage2(
            model, features, labels, settings, teacher_logits=teacher, multi_label=settings.multi_label
        )
        log.stage2["feature_seconds"] = feature_seconds
        after = frozen_fingerprint(model)
        if before != after:
            raise RuntimeError("stage 2 changed the encoder or the final classifier; they must stay frozen")
        log.stage2["frozen_weights_bit_identical"] = True
        if dev is not None:
            log.dev_per_layer_accuracy["after_stage2"] = _dev_accuracy(model, dev, tokenizer, settings)

    output = Path(settings.output)
    save_dtype = torch.float16 if settings.save_dtype == "float16" else torch.float32
    save_model(model, output, tokenizer=tokenizer, dtype=save_dtype)
    log.total_seconds = time.perf_counter() - started
    (output / "training_log.json").write_text(json.dumps(asdict(log), indent=2) + "\n")
    return log


def _init_off_ramp(module: nn.Module) -> None:
    # Same initialisation as BERT's own heads, drawn from the seeded generator for determinism.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
