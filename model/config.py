"""DeeBertConfig: the backbone's transformers config plus off-ramp settings and calibrated presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from model.exit_rule import CRITERIA, DEFAULT_CRITERION, ExitCriterion, get_criterion

Pooling = Literal["first", "mean"]
POOLINGS: tuple[str, ...] = ("first", "mean")
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "distilbert",
    "deberta-v2",
    "modernbert",
)
# Backbones with their own attention (no sdpa path in transformers): DeBERTa-v2/v3's disentangled attention.
EAGER_ONLY: frozenset[str] = frozenset({"deberta-v2"})
# A backbone setting under the names transformers' configs give it (DistilBERT: n_layers, dim, n_heads).
BACKBONE_NAMES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layers"),
    "hidden_size": ("hidden_size", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_heads"),
}
CONFIG_FORMAT = "deebert"


class ConfigError(ValueError):
    """A checkpoint's config is missing, unreadable or inconsistent."""


class UnknownPresetError(KeyError):
    """A threshold string that is neither a number nor one of the checkpoint's presets."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Preset:
    """A named threshold of the checkpoint's exit criterion, with the dev numbers it was calibrated on."""

    name: str
    threshold: float
    accuracy: float | None = None
    expected_saving: float | None = None
    max_accuracy_drop: float | None = None


@dataclass
class DeeBertConfig:
    """Everything needed to rebuild a DeeBERT model: backbone config, labels, off-ramps, presets."""

    backbone: dict[str, Any]
    labels: list[str] = field(default_factory=lambda: ["0", "1"])
    pooling: Pooling = "first"
    off_ramp_dropout: float = 0.1
    max_length: int = 128
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    name: str = "deebert"
    base_model: str | None = None
    exit_criterion: str = DEFAULT_CRITERION
    presets: list[Preset] = field(default_factory=list)
    # Presets calibrated on another runtime's outputs, by `backends.runtime_key` (e.g. "onnxruntime-int8"):
    # quantized outputs move entropies, so a threshold means what its dev numbers say only where calibrated.
    runtime_presets: dict[str, list[Preset]] = field(default_factory=dict)
    # Static int8: each quantized matrix product's input range [min, max] over calibration texts, by the traced
    # graph's tensor name (`model.int8.calibrate_ranges`), with the graph format they were traced in, so that
    # `deebert serve` can build the int8 graphs on first start without the calibration data.
    int8_ranges: dict[str, Any] = field(default_factory=dict)
    # The final off-ramp's activation (a transformers activation name): tanh for ours and for BERT's and
    # RoBERTa's heads, gelu for ELECTRA's (`deebert convert` keeps a classifier's head as it is).
    final_activation: str = "tanh"
    # The final off-ramp's pooling when it differs from the others' (`deebert convert`: the classifier's head
    # reads the first token; the added off-ramps pool the mean). None: `pooling`, like every other off-ramp.
    final_pooling: Pooling | None = None
    # A LayerNorm after the final off-ramp's activation (ModernBERT's head: dense, activation, norm), with its
    # epsilon and whether it has a bias; None: no norm (every other head).
    final_norm_eps: float | None = None
    final_norm_bias: bool = True
    # What the presets were calibrated against: "accuracy" (labels) or "agreement" (with full depth, no labels).
    presets_calibrated_by: str = "accuracy"
    # Set by `deebert convert`: the classifier (directory or hub id) this model's encoder and final head are.
    converted_from: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.final_pooling is not None and self.final_pooling not in POOLINGS:
            raise ConfigError(f"final_pooling must be one of {POOLINGS}, got {self.final_pooling!r}")
        if len(self.labels) < 2:
            raise ConfigError(f"need at least two labels, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be unique, got {self.labels!r}")
        model_type = self.backbone.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"backbone model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        if self.final_activation not in ACT2FN:
            raise ConfigError(f"final_activation must be a transformers activation name, got {self.final_activation!r}")
        if self.presets_calibrated_by not in ("accuracy", "agreement"):
            raise ConfigError(
                f"presets_calibrated_by must be accuracy or agreement, got {self.presets_calibrated_by!r}"
            )
        if self.exit_criterion not in CRITERIA:
            raise ConfigError(f"exit_criterion must be one of {tuple(CRITERIA)}, got {self.exit_criterion!r}")
        self.presets = [p if isinstance(p, Preset) else Preset(**p) for p in self.presets]
        self.runtime_presets = {
            key: [p if isinstance(p, Preset) else Preset(**p) for p in presets]
            for key, presets in self.runtime_presets.items()
        }
        for preset in [*self.presets, *(p for presets in self.runtime_presets.values() for p in presets)]:
            try:
                self.criterion.validate(preset.threshold)
            except ValueError as err:
                raise ConfigError(f"preset {preset.name!r} has an invalid threshold: {err}") from None

    @property
    def criterion(self) -> ExitCriterion:
        """The exit rule this checkpoint's thresholds and presets are for."""
        return get_criterion(self.exit_criterion)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        return int(self.backbone_value("num_hidden_layers"))

    @property
    def hidden_size(self) -> int:
        return int(self.backbone_value("hidden_size"))

    def backbone_value(self, name: str) -> Any:
        """A backbone setting by its usual name, whatever the architecture calls it (KeyError when absent)."""
        for key in BACKBONE_NAMES.get(name, (name,)):
            if key in self.backbone:
                return self.backbone[key]
        raise KeyError(f"the backbone config has no {name}")

    def pooling_of(self, layer: int) -> str:
        """The pooling of off-ramp `layer` (1..n)."""
        if layer == self.num_layers and self.final_pooling is not None:
            return self.final_pooling
        return self.pooling

    @property
    def uses_mean_pooling(self) -> bool:
        """Whether any off-ramp pools the mean (the step graphs then take the mean's weights)."""
        return "mean" in {self.pooling_of(layer) for layer in range(1, self.num_layers + 1)}

    @property
    def is_pair_task(self) -> bool:
        return len(self.text_columns) == 2

    def backbone_config(self) -> PretrainedConfig:
        """The transformers config of the encoder, with sdpa attention (a mask we can rebuild per layer) where
        the architecture has it."""
        values = dict(self.backbone)
        model_type = values.pop("model_type")
        config = AutoConfig.for_model(model_type, **values)
        config._attn_implementation = "eager" if model_type in EAGER_ONLY else "sdpa"
        return config

    def preset(self, name: str) -> Preset:
        """The preset called `name`; KeyError naming the known ones otherwise."""
        for preset in self.presets:
            if preset.name == name:
                return preset
        known = ", ".join(p.name for p in self.presets) or "none"
        raise KeyError(f"unknown preset {name!r} (known: {known})")

    def resolve_threshold(self, value: float | int | str) -> tuple[float, str | None]:
        """A number or a preset name → (threshold of the exit criterion, preset name or None).

        UnknownPresetError for a string that is neither; ValueError for a number outside the criterion's
        range (for entropy: negative, NaN or infinite). The CLI and the server both resolve thresholds here.
        """
        if not isinstance(value, str):
            return self.criterion.validate(value), None
        text = value.strip()
        if any(p.name == text for p in self.presets):
            return self.preset(text).threshold, text
        try:
            number = float(text)
        except ValueError:
            known = ", ".join(p.name for p in self.presets) or "none"
            raise UnknownPresetError(f"{text[:64]!r} is neither a number nor a preset (presets: {known})") from None
        return self.criterion.validate(number), None

    def with_presets(
        self,
        presets: list[Preset],
        exit_criterion: str | None = None,
        runtime: str | None = None,
        calibrated_by: str | None = None,
    ) -> DeeBertConfig:
        """A copy whose presets (and, if given, exit criterion) are replaced; with `runtime`, the presets of
        that runtime (`runtime_presets[runtime]`) instead of the default ones; with `calibrated_by`, what the
        default presets were calibrated by (accuracy or agreement)."""
        data = self.to_dict()
        if runtime is not None:
            data["runtime_presets"] = {**data["runtime_presets"], runtime: [asdict(p) for p in presets]}
        else:
            data["presets"] = [asdict(p) for p in presets]
            if calibrated_by is not None:
                data["presets_calibrated_by"] = calibrated_by
        if exit_criterion is not None:
            data["exit_criterion"] = exit_criterion
            data["runtime_presets"] = {}  # calibrated for another criterion
        data.pop("format", None)
        return DeeBertConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = CONFIG_FORMAT
        return data

    def save(self, directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_backbone(cls, backbone: PretrainedConfig, **settings: Any) -> DeeBertConfig:
        """A config for fresh off-ramps on top of a plain transformers backbone config."""
        values = backbone.to_dict()
        keep = {k: v for k, v in values.items() if not k.startswith("_") and k not in DROPPED_BACKBONE_KEYS}
        keep["model_type"] = backbone.model_type
        return cls(backbone=keep, **settings)

    @classmethod
    def load(cls, directory: Path) -> DeeBertConfig:
        """Read `directory/config.json` written by `save`."""
        path = directory / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{directory} has no config.json") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if not is_deebert_config(data):
            raise ConfigError(f'{path} is not a DeeBERT config (no "format": "{CONFIG_FORMAT}")')
        data.pop("format")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path} has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{path}: {err}") from err


# Keys of a transformers config that describe a task head or tooling, not the encoder.
DROPPED_BACKBONE_KEYS = frozenset(
    {
        "architectures",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "name_or_path",
        "gradient_checkpointing",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "use_cache",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "add_cross_attention",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
    }
)


def is_deebert_config(data: dict[str, Any]) -> bool:
    return data.get("format") == CONFIG_FORMAT
