"""Checkpoints are directories: config.json + model.safetensors + tokenizer files.

A DeeBERT checkpoint loads strictly (missing or unexpected keys are an error naming them); a plain
BERT/RoBERTa checkpoint loads its encoder and starts fresh off-ramps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from model.config import EAGER_ONLY, ConfigError, DeeBertConfig, is_deebert_config
from model.modeling import BACKBONES, WITH_OPTIONAL_POOLER, DeeBert

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be found or does not match the model it claims to be."""


def resolve_directory(source: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded where the network allows it."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {source} is a file; expected a directory with config.json")
    looks_like_hub_id = str(source).count("/") == 1 and not str(source).startswith((".", "/", "~"))
    if not looks_like_hub_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as err:  # network, auth, or unknown repo: all mean "not loadable"
        raise CheckpointError(
            f"checkpoint {source} is not a local directory and could not be downloaded: {err}"
        ) from err


def is_deebert_checkpoint(directory: Path) -> bool:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; not a model checkpoint")
    try:
        return is_deebert_config(json.loads(config_path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err


def require_deebert(directory: Path, source: str) -> None:
    """CheckpointError unless `directory` is a DeeBERT checkpoint, saying in one line what to run instead: a
    Hugging Face classifier is converted (`deebert convert`), a plain encoder is trained (`deebert train`)."""
    if is_deebert_checkpoint(directory):
        return
    data = json.loads((directory / "config.json").read_text())
    architectures = [a for a in data.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if architectures:
        raise CheckpointError(
            f"{source} is a Hugging Face classifier ({architectures[0]}), not a DeeBERT checkpoint: convert it with "
            f"`deebert convert --classifier {source} --texts YOUR_TEXTS.txt --output DIR`, then serve DIR"
        )
    raise CheckpointError(
        f"{source} is not a DeeBERT checkpoint (a plain {data.get('model_type', 'unknown')!s} model): "
        f"train one with `deebert train --base {source} --train DATA --output DIR`, then serve DIR"
    )


def load_model(source: str | Path, dtype: torch.dtype = torch.float32, **fresh_settings: Any) -> DeeBert:
    """Load a DeeBERT checkpoint (strict), or a plain BERT/RoBERTa one with fresh off-ramps.

    `fresh_settings` (labels, pooling, off_ramp_dropout, max_length, text_columns, name) apply only
    when starting from a plain checkpoint.
    """
    directory = resolve_directory(source)
    if is_deebert_checkpoint(directory):
        if fresh_settings:
            raise CheckpointError(
                f"{directory} is already a DeeBERT checkpoint; "
                f"settings {sorted(fresh_settings)} apply only to plain ones"
            )
        return _load_deebert(directory, dtype)
    return _load_plain(directory, str(source), dtype, fresh_settings)


def _load_deebert(directory: Path, dtype: torch.dtype) -> DeeBert:
    try:
        config = DeeBertConfig.load(directory)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}")
    model = DeeBert(config)
    state = load_file(str(weights_path))
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match the DeeBERT config: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
        )
    model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True)
    return model.to(dtype).eval()


def _load_plain(directory: Path, source: str, dtype: torch.dtype, settings: dict[str, Any]) -> DeeBert:
    backbone_config = AutoConfig.from_pretrained(directory)
    if backbone_config.model_type not in BACKBONES:
        raise CheckpointError(
            f"{directory} holds a {backbone_config.model_type!r} model; supported backbones: {sorted(BACKBONES)}"
        )
    settings.setdefault("base_model", source)
    config = DeeBertConfig.from_backbone(backbone_config, **settings)
    model = DeeBert(config)
    backbone_class = BACKBONES[backbone_config.model_type]
    options: dict[str, Any] = {"add_pooling_layer": False} if backbone_config.model_type in WITH_OPTIONAL_POOLER else {}
    attention = "eager" if backbone_config.model_type in EAGER_ONLY else "sdpa"
    pretrained = backbone_class.from_pretrained(directory, attn_implementation=attention, **options)
    result = model.backbone.load_state_dict(pretrained.state_dict(), strict=False)
    if result.missing_keys:
        raise CheckpointError(f"{directory} lacks encoder weights: {sorted(result.missing_keys)}")
    return model.to(dtype).eval()


def save_model(model: DeeBert, directory: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None) -> None:
    """Write config.json, model.safetensors (`dtype` casts floating-point weights on disk, e.g. fp16) and, when
    given, the tokenizer's files: a directory `load_model` reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
