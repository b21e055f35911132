"""`deebert convert`: a fine-tuned Hugging Face sequence classifier → an early-exit model, its own weights frozen.

The classifier's encoder and its classification head stay exactly as they are: the head becomes the final
off-ramp (BERT's pooler + classifier, RoBERTa's and XLM-R's dense-tanh-out_proj on `<s>`, ELECTRA's dense-GELU
head, DistilBERT's pre_classifier-ReLU-classifier, DeBERTa-v2/v3's ContextPooler, ModernBERT's
dense-activation-norm head), so at threshold 0 the converted model answers what the classifier answers.
Off-ramps after layers 1..n-1 are added and trained alone, on features of the frozen encoder computed once (the
paper's stage 2):

- without labels (the default), they learn the final head's own distribution on the user's in-domain texts
  (summed KL divergence: soft targets from the frozen model);
- with `--objective labels`, the texts' labels (summed cross-entropy, the paper's stage 2 as such);
- with `--objective mixed`, both: each off-ramp's KL divergence from the head plus its cross-entropy.

Presets are calibrated on held-out texts by **agreement with full depth**, which needs no labels: `lossless`
answers as full depth on >= 99.5 % of them with the most saving, `balanced` >= 99 %, `fast` >= 97 %. With
`--calibrate-by accuracy` they are calibrated by held-out accuracy instead, as `deebert calibrate` does (for
labelled texts the classifier never saw: on its own training texts accuracy flatters the early layers).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from model.calibrate import PRESET_TOLERANCES, calibrate, choose_presets
from model.checkpoint import CheckpointError, is_deebert_checkpoint, resolve_directory, save_model
from model.config import EAGER_ONLY, DeeBertConfig
from model.data import FORMATS, DataError, Dataset, read_dataset
from model.evaluate import all_layer_outputs, per_layer_accuracy
from model.modeling import WITHOUT_TOKEN_TYPES, DeeBert, OffRamp
from model.saving import saving_from_counts
from model.sweep import SweepPoint, answers, exit_counts, same_answer
from model.tokenization import pad_batch, tokenize
from model.train import TrainSettings, extract_features, frozen_fingerprint, seed_everything, train_stage2

logger = logging.getLogger("deebert.convert")

Objective = Literal["distill", "labels", "mixed"]
CalibrateBy = Literal["agreement", "accuracy"]
# model_type → (the classifier's encoder attribute, where its head's dense and output layers are, head activation;
# None: the config's `pooler_hidden_act`)
HEADS: dict[str, tuple[str, str, str, str | None]] = {
    "bert": ("bert", "bert.pooler.dense", "classifier", "tanh"),
    "roberta": ("roberta", "classifier.dense", "classifier.out_proj", "tanh"),
    "xlm-roberta": ("roberta", "classifier.dense", "classifier.out_proj", "tanh"),
    "electra": ("electra", "classifier.dense", "classifier.out_proj", "gelu"),
    "distilbert": ("distilbert", "pre_classifier", "classifier", "relu"),
    "deberta-v2": ("deberta", "pooler.dense", "classifier", None),  # ContextPooler on [CLS], v2 and v3
    "modernbert": ("model", "head.dense", "classifier", None),  # dense, activation, norm; CLS or mean pooling
}
SUPPORTED = tuple(HEADS)
# Agreement with full depth each preset keeps on the held-out texts (as a fraction it may lose). `balanced`
# keeps 99 %: at 98.5 % the demonstration (benchmarks/convert_demo.py) lost 0.57 point of SST-2 dev accuracy
# and 0.98 of MRPC's, more than the 0.5 point `balanced` stands for when calibrated with labels; a text that
# changes its answer costs at most one point per 1 % and about half of that in those runs.
AGREEMENT_TOLERANCES: dict[str, float] = {"lossless": 0.005, "balanced": 0.01, "fast": 0.03}


class ConvertError(ValueError):
    """Input `deebert convert` cannot use: said in one line."""


@dataclass
class ConvertSettings:
    """Every knob of a conversion; saved in `conversion_log.json`."""

    classifier: str
    texts: str
    output: str
    objective: Objective = "distill"
    # What the presets are calibrated by on the held-out texts. Agreement with full depth by default, labels or
    # not: held-out texts are usually the classifier's own training texts, where accuracy flatters the early
    # layers (benchmarks/convert_demo: accuracy-calibrated `balanced` lost 1.95 points of SST-2 dev accuracy,
    # agreement-calibrated 0.69). `accuracy` is for labelled texts the classifier never saw.
    calibrate_by: CalibrateBy = "agreement"
    text_columns: list[str] | None = None
    label_column: str = "label"
    max_length: int = 128
    max_texts: int | None = None
    held_out: float = 0.1
    max_held_out: int = 2000
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 42
    name: str | None = None
    progress: bool = True


@dataclass
class ConversionLog:
    """What a conversion did and measured."""

    settings: dict[str, Any]
    model_type: str = ""
    num_layers: int = 0
    train_texts: int = 0
    held_out_texts: int = 0
    full_depth_max_logit_difference: float = 0.0
    per_layer_agreement_with_full_depth: list[float] = field(default_factory=list)
    presets_calibrated_by: str = "agreement"
    per_layer_accuracy: list[float] | None = None
    stage2: dict[str, Any] = field(default_factory=dict)
    presets: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def classifier_config(source: str) -> tuple[Any, Path]:
    """The classifier's transformers config and directory, checked without loading its weights; ConvertError
    when the source is not a sequence classifier this converter supports."""
    try:
        directory = resolve_directory(source)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    if not (directory / "config.json").is_file():
        raise ConvertError(f"{source} has no config.json: not a Hugging Face model directory")
    if is_deebert_checkpoint(directory):
        raise ConvertError(f"{source} is already a DeeBERT checkpoint: serve it (deebert serve --checkpoint ...)")
    config = AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        found = ", ".join(architectures) or "no architecture named"
        raise ConvertError(f"{source} is not a sequence classifier ({found}); convert takes *ForSequenceClassification")
    if config.model_type not in HEADS:
        raise ConvertError(
            f"{source} is a {config.model_type!r} classifier; deebert convert supports {', '.join(SUPPORTED)}"
        )
    if config.num_labels < 2:
        raise ConvertError(f"{source} has {config.num_labels} output (regression); convert needs 2 or more labels")
    pooler_size = getattr(config, "pooler_hidden_size", None)
    if pooler_size is not None and pooler_size != config.hidden_size:
        raise ConvertError(
            f"{source}: its head's pooler is {pooler_size} wide and its encoder {config.hidden_size}; "
            "deebert convert keeps heads as wide as the encoder"
        )
    return config, directory


def load_classifier(source: str) -> tuple[PreTrainedModel, Any, Path]:
    """The classifier (fp32, eval, sdpa attention where the architecture has it), its tokenizer and its
    directory (`classifier_config`'s checks first)."""
    config, directory = classifier_config(source)
    attention = "eager" if config.model_type in EAGER_ONLY else "sdpa"
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, attn_implementation=attention, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=True)
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer, directory


def is_multi_label(config: Any) -> bool:
    """A classifier with one sigmoid per label (transformers' `problem_type`)."""
    return getattr(config, "problem_type", None) == "multi_label_classification"


def agreement_points(
    probabilities: torch.Tensor, entropies: torch.Tensor, criterion: Any, multi_label: bool
) -> list[SweepPoint]:
    """Each candidate threshold's agreement with full depth (as `accuracy`) and expected saving."""
    full = answers(probabilities[-1], multi_label)
    candidates = criterion.candidates(probabilities, entropies)
    thresholds = torch.tensor(candidates, dtype=torch.float32).unsqueeze(1)
    exit_layers = criterion.first_exit_layers(probabilities, entropies, thresholds)  # [candidates, samples]
    samples = torch.arange(probabilities.shape[1])
    num_layers = probabilities.shape[0]
    points = []
    for threshold, layers in zip(candidates, exit_layers, strict=True):
        at_exit = answers(probabilities[layers, samples], multi_label)
        agreement = float(same_answer(at_exit, full, multi_label).float().mean())
        counts = exit_counts(layers, num_layers)
        points.append(SweepPoint(threshold, agreement, saving_from_counts(counts) or 0.0, counts))
    return points


def label_names(config: Any) -> list[str]:
    """A classifier config's label names in label-id order (its `id2label`)."""
    id2label: dict[Any, Any] = dict(config.id2label or {})
    count = int(config.num_labels or 0)
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]


def _module(root: nn.Module, dotted: str) -> nn.Linear:
    module: Any = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return cast(nn.Linear, module)


def deebert_from_classifier(
    classifier: PreTrainedModel,
    source: str,
    max_length: int,
    text_columns: list[str],
    name: str,
) -> DeeBert:
    """A DeeBert whose encoder and final off-ramp are the classifier's own weights (copied, not retrained);
    off-ramps 1..n-1 initialised as BERT initialises its heads."""
    config = classifier.config
    model_type = config.model_type
    encoder_name, dense_name, out_name, head_activation = HEADS[model_type]
    modernbert = model_type == "modernbert"
    activation = head_activation or str(config.classifier_activation if modernbert else config.pooler_hidden_act)
    labels = label_names(config)
    deebert_config = DeeBertConfig.from_backbone(
        config,
        labels=labels,
        pooling="mean",  # the added off-ramps (measured: see ConvertSettings.pooling)
        # the classifier's own head reads the first token (ModernBERT: or pools the mean, as configured)
        final_pooling="mean" if modernbert and config.classifier_pooling == "mean" else "first",
        final_norm_eps=float(config.norm_eps) if modernbert else None,
        final_norm_bias=bool(config.norm_bias) if modernbert else True,
        max_length=max_length,
        text_columns=text_columns,
        name=name,
        base_model=source,
        final_activation=activation,
        presets_calibrated_by="agreement",
        converted_from=source,
        exit_criterion="label-entropy" if is_multi_label(config) else "entropy",
    )
    model = DeeBert(deebert_config)
    encoder = getattr(classifier, encoder_name)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
    result = model.backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(
            f"{source}: the encoder's weights do not map onto a {model_type} encoder "
            f"(missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)})"
        )
    final = model.final_classifier
    pairs: list[tuple[Any, Any]] = [
        (final.dense, _module(classifier, dense_name)),
        (final.classifier, _module(classifier, out_name)),
    ]
    if final.norm is not None:
        pairs.append((final.norm, _module(classifier, "head.norm")))
    with torch.no_grad():
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            if ours.bias is not None:  # a head without a bias (ModernBERT's may have none) adds zero
                ours.bias.copy_(theirs.bias) if theirs.bias is not None else ours.bias.zero_()
    generator = torch.Generator().manual_seed(0)
    for ramp in cast(list[OffRamp], list(model.off_ramps)[:-1]):
        for linear in (ramp.dense, ramp.classifier):
            with torch.no_grad():
                linear.weight.normal_(0.0, 0.02, generator=generator)
                linear.bias.zero_()
    return model.eval()


def read_texts(path: str, text_columns: list[str] | None, label_column: str, label_names: list[str]) -> Dataset:
    """Texts to convert on: a TSV/CSV/JSONL file with a text column (two for pairs; labels optional), or any
    other file as plain text, one text per line. ConvertError naming the problem otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConvertError(f"{path}: no such file")
    if file.suffix.lower() in FORMATS:
        try:
            return read_dataset(
                file,
                label_names=label_names,
                text_columns=text_columns,
                label_column=label_column,
                require_labels=False,
            )
        except DataError as err:
            raise ConvertError(str(err)) from None
    if text_columns:
        raise ConvertError(f"{path} is plain text (one text per line): --text-column applies to TSV/CSV/JSONL files")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConvertError(f"{path} has no texts")
    return Dataset(texts, None, None, label_names, ["sentence"], str(file))


def _max_length(classifier: PreTrainedModel, tokenizer: Any, requested: int) -> int:
    positions = int(getattr(classifier.config, "max_position_embeddings", requested))
    offset = 0
    if classifier.config.model_type in ("roberta", "xlm-roberta"):  # positions start after the padding index
        offset = int(getattr(classifier.config, "pad_token_id", 1) or 1) + 1
    limit = min(positions - offset, int(getattr(tokenizer, "model_max_length", positions) or positions))
    return max(2, min(requested, limit))


def convert(settings: ConvertSettings) -> ConversionLog:
    """Convert `settings.classifier` with `settings.texts`; write the checkpoint and `conversion_log.json`."""
    started = time.perf_counter()
    seed_everything(settings.seed)
    log = ConversionLog(settings=asdict(settings))
    config, _ = classifier_config(settings.classifier)
    data = read_texts(settings.texts, settings.text_columns, settings.label_column, label_names(config))
    uses_labels = settings.objective != "distill"
    if uses_labels and data.labels is None:
        raise ConvertError(
            f"--objective {settings.objective} needs a {settings.label_column!r} column in {settings.texts}"
        )
    if settings.calibrate_by == "accuracy" and not data.has_labels:
        raise ConvertError(f"--calibrate-by accuracy needs a {settings.label_column!r} column in {settings.texts}")
    multi_label = is_multi_label(config)
    if uses_labels and multi_label:
        raise ConvertError(
            f"--objective {settings.objective} takes single-label classifiers; a multi-label one converts with distill"
        )
    if settings.max_texts is not None and settings.max_texts < len(data):
        picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))
        data = data.subset(sorted(picked[: settings.max_texts].tolist()))
    if len(data) < 20:
        raise ConvertError(f"{settings.texts} has {len(data)} texts; convert needs at least 20 (hundreds or more)")
    classifier, tokenizer, _ = load_classifier(settings.classifier)
    max_length = _max_length(classifier, tokenizer, settings.max_length)
    name = settings.name or Path(settings.output).name
    model = deebert_from_classifier(classifier, settings.classifier, max_length, data.text_columns, name)
    log.model_type, log.num_layers = classifier.config.model_type, model.num_layers

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed + 1)).tolist()
    held = max(1, min(settings.max_held_out, round(settings.held_out * len(data))))
    held_out, train = data.subset(sorted(order[:held])), data.subset(sorted(order[held:]))
    log.train_texts, log.held_out_texts = len(train), len(held_out)
    pad_id = int(tokenizer.pad_token_id)
    encoded = tokenize(tokenizer, train.texts, train.text_pairs, max_length)
    log.full_depth_max_logit_difference = _full_depth_difference(model, classifier, encoded, pad_id)

    before = frozen_fingerprint(model)
    features = extract_features(model, encoded, pad_id, batch_size=64, progress=settings.progress, last=True)
    with torch.no_grad():
        teacher = model.final_classifier.classify(features[-1])
    train_settings = TrainSettings(
        base=settings.classifier,
        train_file=settings.texts,
        output=settings.output,
        scheme="two-stage" if settings.objective == "labels" else "distill",
        stage2_epochs=settings.epochs,
        stage2_lr=settings.lr,
        stage2_batch_size=settings.batch_size,
        seed=settings.seed,
        progress=settings.progress,
    )
    targets = train.labels if uses_labels else [0] * len(train)
    assert targets is not None
    soft_targets = None if settings.objective == "labels" else teacher
    log.stage2 = train_stage2(
        model,
        features[:-1],
        targets,
        train_settings,
        teacher_logits=soft_targets,
        multi_label=multi_label,
        with_labels=settings.objective == "mixed",
    )
    if frozen_fingerprint(model) != before:
        raise RuntimeError("conversion changed the classifier's own weights; they must stay frozen")
    log.stage2["frozen_weights_bit_identical"] = True

    held_encoded = tokenize(tokenizer, held_out.texts, held_out.text_pairs, max_length)
    probabilities, entropies = all_layer_outputs(model, held_encoded, pad_id, progress=settings.progress)
    full_depth = answers(probabilities[-1], multi_label)
    log.per_layer_agreement_with_full_depth = [
        float(same_answer(answers(layer, multi_label), full_depth, multi_label).float().mean())
        for layer in probabilities
    ]
    if held_out.labels is not None and not multi_label:
        log.per_layer_accuracy = per_layer_accuracy(probabilities, held_out.labels)
    # Presets by agreement with full depth: for each, the most expected saving whose answers agree with full
    # depth on at least 1 − its tolerance of the held-out texts (AGREEMENT_TOLERANCES), no labels needed; or
    # (`--calibrate-by accuracy`) by held-out accuracy as `deebert calibrate` does. Each preset's agreement is
    # recorded beside it.
    criterion = model.config.criterion
    points = agreement_points(probabilities, entropies, criterion, multi_label)
    if settings.calibrate_by == "accuracy":
        presets = calibrate(probabilities, entropies, held_out.targets(), criterion=criterion)
    else:
        presets = choose_presets(points, 1.0, AGREEMENT_TOLERANCES, criterion)
    agreement = {p.threshold: p.accuracy for p in points}
    log.presets = [asdict(p) | {"agreement": agreement[p.threshold]} for p in presets]
    log.presets_calibrated_by = settings.calibrate_by
    model.config = model.config.with_presets(presets, calibrated_by=log.presets_calibrated_by)

    output = Path(settings.output)
    save_model(model, output, tokenizer=tokenizer, dtype=torch.float32)
    log.seconds = time.perf_counter() - started
    (output / "conversion_log.json").write_text(json.dumps(asdict(log), indent=2) + "\n")
    _write_card(output, log, model)
    return log


def _full_depth_difference(model: DeeBert, classifier: PreTrainedModel, encoded: list[Any], pad_id: int) -> float:
    """The largest |logit difference| between the converted model at full depth and the classifier itself, on
    up to 64 of the texts (padded together): the conversion's own check that the final off-ramp is the head."""
    batch = pad_batch(encoded[:64], pad_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if classifier.config.model_type not in WITHOUT_TOKEN_TYPES:
        inputs["token_type_ids"] = batch.token_type_ids
    with torch.inference_mode():
        ours = model.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)[-1]
        theirs = classifier(**inputs).logits
    difference = float((ours - theirs).abs().max())
    if difference > 1e-4:
        raise RuntimeError(f"the converted model's full depth differs from the classifier by {difference:.2e}")
    return difference


def _write_card(output: Path, log: ConversionLog, model: DeeBert) -> None:
    """MODEL_CARD.md: where the model came from, how its presets were calibrated, what they measured."""
    rows = "\n".join(
        f"| `{p['name']}` | {p['threshold']:.4f} | {100 * p['agreement']:.2f} % | "
        f"{100 * (p['expected_saving'] or 0):.1f} % |"
        for p in log.presets
    )
    per_layer = ", ".join(f"{100 * a:.1f}" for a in log.per_layer_agreement_with_full_depth)
    if log.presets_calibrated_by == "accuracy":
        budgets = ", ".join(f"`{name}` {100 * drop:g}" for name, drop in PRESET_TOLERANCES.items())
        calibration = (
            f"Presets are calibrated **by accuracy** on {log.held_out_texts} held-out labelled texts (as "
            f"`deebert calibrate`: the most saving within these points of full depth's accuracy: {budgets}):"
        )
    else:
        floors = ", ".join(f"`{name}` {100 * (1 - lost):g} %" for name, lost in AGREEMENT_TOLERANCES.items())
        calibration = (
            f"Presets are calibrated **by agreement with full depth** on {log.held_out_texts} held-out texts (no "
            f"labels needed: the most saving at this agreement or more: {floors}):"
        )
    text = f"""# {model.config.name}

Converted by `deebert convert` from the classifier `{log.settings["classifier"]}` ({log.model_type}, {log.num_layers}
layers) on {log.train_texts} texts of `{log.settings["texts"]}` (objective: {log.settings["objective"]}). The
classifier's encoder and head are unchanged (its head is the final off-ramp): at threshold 0 this model answers
as the classifier (largest |logit difference| on 64 of the texts: {log.full_depth_max_logit_difference:.1e}).

{calibration}

| preset | entropy threshold | agreement with full depth | expected saving |
| --- | ---: | ---: | ---: |
{rows}

Per-layer agreement with full depth (held out): {per_layer} %.
Conversion took {log.seconds:.0f} s; `conversion_log.json` has every number.
"""
    (output / "MODEL_CARD.md").write_text(text)
