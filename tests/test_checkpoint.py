"""Checkpoint save/load: round trip, strict keys, plain backbones, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_model, save_model
from model.modeling import DeeBert
from model.tokenization import load_tokenizer, pad_batch, tokenize
from tests.helpers import save_plain_backbone, tiny_model

TEXTS = ["the movie was good", "awful and boring film", "i love this cat"]


def _outputs(model: DeeBert, directory: Path) -> torch.Tensor:
    tokenizer = load_tokenizer(directory)
    batch = pad_batch(tokenize(tokenizer, TEXTS, None, 32), tokenizer.pad_token_id)
    with torch.inference_mode():
        return model(batch.input_ids, batch.attention_mask, batch.token_type_ids)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_round_trip_gives_identical_outputs(model_type: str, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(model_type, pooling="mean")
    save_model(model, tmp_path, tokenizer=tokenizer)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    torch.testing.assert_close(_outputs(loaded, tmp_path), _outputs(model, tmp_path), rtol=0, atol=0)


def test_fp16_checkpoint_loads_as_fp32(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    save_model(model, tmp_path, tokenizer=tokenizer, dtype=torch.float16)
    assert all(
        t.dtype == torch.float16
        for t in load_file(str(tmp_path / "model.safetensors")).values()
        if t.is_floating_point()
    )
    loaded = load_model(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(_outputs(loaded, tmp_path), _outputs(model, tmp_path), atol=0.1, rtol=0.05)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    save_model(tiny_model("bert"), tmp_path, tokenizer=tokenizer)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("off_ramps.2.dense.weight")
    state["off_ramps.9.dense.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert "off_ramps.2.dense.weight" in str(err.value) and "off_ramps.9.dense.weight" in str(err.value)


def test_plain_backbone_starts_fresh_off_ramps(tmp_path: Path) -> None:
    for model_type in ("bert", "roberta"):
        directory = save_plain_backbone(tmp_path / model_type, model_type)
        model = load_model(directory, labels=["x", "y", "z"], pooling="mean")
        assert model.config.num_labels == 3 and model.config.pooling == "mean"
        assert model.config.base_model == str(directory)
        assert len(model.off_ramps) == model.num_layers == 4
        embeddings = load_file(str(directory / "model.safetensors"))
        key = next(k for k in embeddings if k.endswith("word_embeddings.weight"))
        torch.testing.assert_close(model.backbone.embeddings.word_embeddings.weight, embeddings[key])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "not valid JSON"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))), "gpt2"),
    ],
)
def test_bad_checkpoint_directories_fail_clearly(setup, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "ckpt"
    setup(directory)
    with pytest.raises((CheckpointError, ValueError)) as err:
        load_model(directory)
    assert message in str(err.value)


def test_deebert_checkpoint_without_weights_fails_clearly(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    save_model(tiny_model("bert"), tmp_path, tokenizer=tokenizer)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(tmp_path)
