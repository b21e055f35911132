"""Two-stage training on tiny models: loss falls, stage 2 freezes, determinism, pairs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_model
from model.tokenization import load_tokenizer, tokenize
from model.train import TrainSettings, extract_features, layer_loss_weights, train, train_stage1, train_stage2
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


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def _tiny_run(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    base = save_plain_backbone(tmp_path / "base")
    rows = sentiment_rows(48)
    settings = _settings(base, tmp_path / "unused.tsv", tmp_path / "out", **overrides)
    model = load_model(base, labels=["0", "1"])
    tokenizer = load_tokenizer(base)
    encoded = tokenize(tokenizer, [r[0] for r in rows], None, 24)
    return model, tokenizer, encoded, [int(r[1]) for r in rows], settings


@pytest.mark.parametrize(
    ("scheme", "epochs", "ramps_trained"),
    [
        ("two-stage", 2, False),  # stage 1: encoder + final classifier only
        ("distill", 2, False),  # same stage 1 as two-stage
        ("joint", 2, True),
        ("weighted-joint", 2, True),
        ("alternating", 1, False),  # epoch 1 trains on the final layer's loss only
        ("alternating", 2, True),  # epoch 2 on every off-ramp's loss
    ],
)
def test_each_scheme_trains_the_parameters_it_should(
    tmp_path: Path, scheme: str, epochs: int, ramps_trained: bool
) -> None:
    model, tokenizer, encoded, labels, settings = _tiny_run(tmp_path, scheme=scheme, stage1_epochs=epochs)
    backbone, final = _snapshot(model.backbone), _snapshot(model.final_classifier)
    ramps = [_snapshot(r) for r in list(model.off_ramps)[:-1]]
    log = train_stage1(model, encoded, labels, settings, tokenizer.pad_token_id)
    assert _changed(model.backbone, backbone) and _changed(model.final_classifier, final)
    for ramp, before in zip(list(model.off_ramps)[:-1], ramps, strict=True):
        assert _changed(ramp, before) is ramps_trained
    assert len(log["layer_loss_weights_by_epoch"]) == epochs


def test_layer_loss_weights_follow_each_scheme() -> None:
    assert layer_loss_weights("two-stage", 0, 4) == [0, 0, 0, 1]
    assert layer_loss_weights("joint", 3, 4) == [1, 1, 1, 1]
    assert layer_loss_weights("weighted-joint", 0, 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])  # i / Σ j
    assert [layer_loss_weights("alternating", e, 3) for e in range(3)] == [[0, 0, 1], [1, 1, 1], [0, 0, 1]]


def test_distill_stage2_learns_the_final_classifier_not_the_labels(tmp_path: Path) -> None:
    model, tokenizer, encoded, labels, settings = _tiny_run(tmp_path, scheme="distill")
    train_stage1(model, encoded, labels, settings, tokenizer.pad_token_id)
    features = extract_features(model, encoded, tokenizer.pad_token_id, batch_size=16, progress=False, last=True)
    with torch.no_grad():
        teacher = model.final_classifier.classify(features[-1])
    frozen = _snapshot(model.backbone), _snapshot(model.final_classifier)
    start = [_snapshot(r) for r in list(model.off_ramps)[:-1]]
    torch.manual_seed(0)  # the off-ramps' dropout
    first = train_stage2(model, features[:-1], labels, settings, teacher_logits=teacher)
    assert first["objective"] == "kl-from-final-classifier"
    assert first["epoch_loss_sum_over_ramps"][-1] < first["epoch_loss_sum_over_ramps"][0]
    assert not _changed(model.backbone, frozen[0]) and not _changed(model.final_classifier, frozen[1])
    learned = [_snapshot(r) for r in list(model.off_ramps)[:-1]]
    # Flipping every label changes nothing: the targets are the teacher's distribution.
    for ramp, before in zip(list(model.off_ramps)[:-1], start, strict=True):
        ramp.load_state_dict(before)
    torch.manual_seed(0)
    train_stage2(model, features[:-1], [1 - y for y in labels], settings, teacher_logits=teacher)
    for ramp, expected in zip(list(model.off_ramps)[:-1], learned, strict=True):
        assert not _changed(ramp, expected)


@pytest.mark.parametrize("scheme", ["joint", "distill"])
def test_train_runs_each_scheme_end_to_end(tmp_path: Path, scheme: str) -> None:
    base = save_plain_backbone(tmp_path / "base")
    train_file = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], sentiment_rows(32))
    log = train(_settings(base, train_file, tmp_path / "out", scheme=scheme, stage1_epochs=1, stage2_epochs=1))
    assert log.settings["scheme"] == scheme
    assert (log.stage2 != {}) is (scheme == "distill")
    assert load_model(tmp_path / "out").num_layers == 4


def test_unknown_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two-stage"):
        train(_settings(tmp_path, tmp_path / "train.tsv", tmp_path / "out", scheme="magic"))


def topic_rows(count: int, seed: int = 0) -> list[list[str]]:
    """Multi-label toy data: each text mentions any subset of three topics (by one word each), label column
    'comma-separated names' (empty: none)."""
    generator = torch.Generator().manual_seed(seed)
    topics = {"animals": "cat", "people": "woman", "films": "movie"}  # words of the test vocabulary
    fillers = ["the story was", "i said that it is", "this was really", "a plot and"]
    rows = []
    for i in range(count):
        on = [name for name in topics if int(torch.randint(2, (1,), generator=generator))]
        rows.append([" ".join([fillers[i % 4], *[topics[name] for name in on]]), ",".join(on)])
    return rows


def test_multi_label_training_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`deebert train --multi-label`: a set of labels per text, binary cross-entropies in both stages, the
    label-entropy exit rule; `deebert calibrate` scores presets by subset accuracy; the server answers every
    label's sigmoid and which are on."""
    import asyncio

    from deebert.cli import main
    from server.engine import Engine
    from tests.server_helpers import make_app, serving

    base = save_plain_backbone(tmp_path / "base")
    train_file = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], topic_rows(160))
    dev_file = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], topic_rows(48, seed=1))
    settings = _settings(
        base,
        train_file,
        tmp_path / "out",
        dev_file=str(dev_file),
        multi_label=True,
        pooling="mean",
        stage1_epochs=10,
        stage1_lr=1e-3,
        stage2_epochs=8,
    )
    log = train(settings)
    assert log.stage1["epoch_loss"][-1] < 0.8 * log.stage1["epoch_loss"][0]
    assert log.stage2["objective"] == "binary-cross-entropy"
    model = load_model(tmp_path / "out")
    assert model.config.exit_criterion == "label-entropy" and model.config.labels == ["animals", "films", "people"]
    # Subset accuracy (all three labels right): guessing three coin flips scores 1/8.
    after = log.dev_per_layer_accuracy["after_stage2"]
    assert after[-1] > 0.3 and max(after) > 0.5, after

    assert main(["calibrate", "--checkpoint", str(tmp_path / "out"), "--data", str(dev_file), "--no-progress"]) == 0
    capsys.readouterr()
    calibrated = load_model(tmp_path / "out")
    assert [p.name for p in calibrated.config.presets] == ["lossless", "balanced", "fast"]
    assert all(p.accuracy is not None and 0.0 <= p.accuracy <= 1.0 for p in calibrated.config.presets)

    async def ask() -> dict[str, object]:
        engine = Engine(calibrated, load_tokenizer(tmp_path / "out"), torch.device("cpu"))
        async with serving(make_app(engine)) as client:
            text = "the story was cat and movie"
            response = await client.post("/v1/classify", json={"texts": [text]}, headers={"X-Exit-Threshold": "0"})
        return response.json()  # type: ignore[no-any-return]

    answer = asyncio.run(ask())
    result = answer["results"][0]  # type: ignore[index]
    assert set(result["probabilities"]) == {"animals", "films", "people"}
    assert result["labels_on"] == [name for name, p in result["probabilities"].items() if p >= 0.5]
