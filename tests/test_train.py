"""Two-stage training on tiny models: loss falls, stage 2 freezes, determinism, pairs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.checkpoint import load_model
from model.tokenization import load_tokenizer, tokenize
from model.train import TrainSettings, extract_features, train, train_stage1, train_stage2
from tests.helpers import save_plain_backbone, sentiment_rows, write_tsv


def _settings(base: Path, train_file: Path, output: Path, **overrides: object) -> TrainSettings:
    values: dict[str, object] = {
        "base": str(base),
        "train_file": str(train_file),
        "output": str(output),
        "max_length": 24,
        "batch_size": 8,
        "stage1_epochs": 3,
        "stage1_lr": 2e-3,
        "stage2_epochs": 3,
        "stage2_lr": 5e-3,
        "stage2_batch_size": 16,
        "progress": False,
        "seed": 7,
    }
    values.update(overrides)
    return TrainSettings(**values)  # type: ignore[arg-type]


def test_stage2_trains_only_the_intermediate_off_ramps(tmp_path: Path) -> None:
    base = save_plain_backbone(tmp_path / "base")
    train_file = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sentiment_rows(64))
    settings = _settings(base, train_file, tmp_path / "out")
    model = load_model(base, labels=["0", "1"])
    tokenizer = load_tokenizer(base)
    rows = sentiment_rows(64)
    encoded = tokenize(tokenizer, [r[0] for r in rows], None, 24)
    labels = [int(r[1]) for r in rows]
    stage1 = train_stage1(model, encoded, labels, settings, tokenizer.pad_token_id)
    assert stage1["epoch_loss"][-1] < stage1["epoch_loss"][0]
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    final_before = {k: v.clone() for k, v in model.final_classifier.state_dict().items()}
    ramps_before = [{k: v.clone() for k, v in r.state_dict().items()} for r in list(model.off_ramps)[:-1]]
    features = extract_features(model, encoded, tokenizer.pad_token_id, batch_size=16, progress=False)
    assert features.shape == (model.num_layers - 1, 64, model.config.hidden_size)
    stage2 = train_stage2(model, features, labels, settings)
    assert stage2["epoch_loss_sum_over_ramps"][-1] < stage2["epoch_loss_sum_over_ramps"][0]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in model.final_classifier.state_dict().items():
        assert torch.equal(value, final_before[key]), key
    for ramp, before in zip(list(model.off_ramps)[:-1], ramps_before, strict=True):
        assert not torch.equal(ramp.dense.weight, before["dense.weight"])


def test_train_writes_a_checkpoint_and_log_and_is_deterministic(tmp_path: Path) -> None:
    base = save_plain_backbone(tmp_path / "base")
    train_file = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sentiment_rows(48))
    dev_file = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(16, seed=3))
    first = train(_settings(base, train_file, tmp_path / "a", dev_file=str(dev_file), label_names=["neg", "pos"]))
    second = train(_settings(base, train_file, tmp_path / "b", dev_file=str(dev_file), label_names=["neg", "pos"]))
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["stage2"]["frozen_weights_bit_identical"] is True
    assert len(log["dev_per_layer_accuracy"]["after_stage2"]) == 4
    assert len(log["stage1"]["dev_final_layer_accuracy_by_epoch"]) == 3
    assert first.stage1["epoch_loss"] == second.stage1["epoch_loss"]
    weights_a = load_file(str(tmp_path / "a" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    loaded = load_model(tmp_path / "a")
    assert loaded.config.labels == ["neg", "pos"]
    assert weights_a["off_ramps.0.dense.weight"].dtype == torch.float16


def test_pair_task_with_string_labels_end_to_end(tmp_path: Path) -> None:
    base = save_plain_backbone(tmp_path / "base", "roberta")
    rows = [
        ["the cat sat on the mat", "the cat sat", "entailment"],
        ["the dog sat", "the cat was good", "not_entailment"],
        ["a man said good", "a man said", "entailment"],
        ["the movie was bad", "the film was great", "not_entailment"],
    ] * 6
    train_file = write_tsv(tmp_path / "rte.tsv", ["sentence1", "sentence2", "label"], rows)
    train(_settings(base, train_file, tmp_path / "out", stage1_epochs=1, stage2_epochs=1))
    model = load_model(tmp_path / "out")
    assert model.config.labels == ["entailment", "not_entailment"]
    assert model.config.text_columns == ["sentence1", "sentence2"] and model.config.is_pair_task
