"""`deebert convert`: tiny random classifiers of every supported architecture, built from a config (no download),
converted in seconds: full depth equals the classifier on every backend, off-ramps learn, bad input is one line."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel

from deebert.cli import main
from model import exit_rule
from model.backends import load_backend
from model.checkpoint import CheckpointError, load_model, require_deebert
from model.convert import SUPPORTED, ConvertError, ConvertSettings, convert, load_classifier
from model.int8 import calibrate_ranges
from model.onnx_export import layer_file
from model.tokenization import load_tokenizer, pad_batch, tokenize
from server.engine import Engine
from tests.helpers import (
    HIDDEN,
    LAYERS,
    assert_alone_equals_batched,
    assert_compacts_mixed_thresholds,
    assert_matches_torch,
    backbone_values,
    write_vocab,
)
from tests.server_helpers import make_app, serving

GOOD = ["great", "good", "fun", "love", "brilliant"]
BAD = ["awful", "bad", "dull", "boring", "terrible"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "it", "i", "this", "very", "story", "cast", "and"]
PARITY_TOLERANCE = 1e-5
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def toy_texts(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts whose label is set by one word anywhere in them: the first layer can already tell."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(2, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label else BAD))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def classifier_config(model_type: str, vocab_size: int, labels: tuple[str, ...] = ("negative", "positive")) -> Any:
    values: dict[str, Any] = backbone_values(model_type, vocab_size)
    values.pop("model_type")
    values |= {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    if model_type in ("roberta", "xlm-roberta"):
        values["type_vocab_size"] = 1
    if model_type == "electra":
        values["embedding_size"] = 16  # ELECTRA projects its embeddings up to the hidden size
    if model_type == "distilbert":  # its own names for the same settings
        values |= {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": 2, "hidden_dim": 64}
    if model_type == "deberta-v2":  # as DeBERTa-v3 is configured: log-bucketed relative positions, no absolute ones
        values |= {"relative_attention": True, "position_buckets": 16, "max_relative_positions": -1,
                   "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm", "position_biased_input": False,
                   "type_vocab_size": 0, "pooler_hidden_act": "gelu"}  # fmt: skip
    if model_type == "modernbert":  # every other layer global, the rest a 2-token sliding window (rotary both)
        values |= {"global_attn_every_n_layers": 2, "local_attention": 4, "classifier_pooling": "cls",
                   "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3}  # fmt: skip
    return AutoConfig.for_model(model_type, **values)


def write_classifier(
    directory: Path,
    model_type: str,
    fine_tune_steps: int = 0,
    labels: tuple[str, ...] | None = None,
    **overrides: Any,
) -> Path:
    """A tiny random `{model_type}ForSequenceClassification` saved with a tokenizer; with `fine_tune_steps`,
    first fine-tuned a little on the toy task by a plain loop over the transformers model (not our code)."""
    tokenizer = write_vocab(directory)
    torch.manual_seed(3)
    config = classifier_config(model_type, tokenizer.vocab_size, *([labels] if labels else []))
    for name, value in overrides.items():
        setattr(config, name, value)
    if labels:  # one sigmoid per label
        config.problem_type = "multi_label_classification"
    model = AutoModelForSequenceClassification.from_config(config)
    if fine_tune_steps:
        texts, labels = toy_texts(256, seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(fine_tune_steps):
            rows = [(step * 32 + i) % len(texts) for i in range(32)]
            batch = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
            inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or model_type == "bert"}
            loss = model(**inputs, labels=torch.tensor([labels[i] for i in rows])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().save_pretrained(str(directory))
    return directory


def write_lines(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def classifier_logits(directory: Path, texts: list[str]) -> torch.Tensor:
    classifier, tokenizer, _ = load_classifier(str(directory))
    batch = pad_batch(tokenize(tokenizer, texts, None, 64), int(tokenizer.pad_token_id))
    with torch.inference_mode():
        return classifier(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def quick(directory: Path, texts: Path, output: Path, **overrides: Any) -> ConvertSettings:
    values: dict[str, Any] = {"epochs": 4, "progress": False, "max_length": 48} | overrides
    return ConvertSettings(classifier=str(directory), texts=str(texts), output=str(output), **values)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_full_depth_equals_the_classifier_on_every_backend(tmp_path: Path, model_type: str) -> None:
    source = write_classifier(tmp_path / "classifier", model_type)
    texts, _ = toy_texts(120)
    log = convert(quick(source, write_lines(tmp_path / "texts.txt", texts), tmp_path / "out"))
    assert log.full_depth_max_logit_difference <= PARITY_TOLERANCE
    assert log.stage2["frozen_weights_bit_identical"]

    model = load_model(tmp_path / "out")
    assert model.config.converted_from == str(source) and model.config.presets_calibrated_by == "agreement"
    assert [p.name for p in model.config.presets] == ["lossless", "balanced", "fast"]
    probe = texts[:9]  # padded together: lengths differ
    expected = classifier_logits(source, probe)
    tokenizer = load_tokenizer(tmp_path / "out")
    batch = pad_batch(tokenize(tokenizer, probe, None, 48), int(tokenizer.pad_token_id))
    backends = [("torch", model), ("onnxruntime", load_backend(model, "onnxruntime", cache_dir=tmp_path / "cache"))]
    if HAS_OPENVINO:
        backends.append(("openvino", load_backend(model, "openvino", cache_dir=tmp_path / "cache")))
    for name, served in backends:
        with torch.inference_mode():
            logits = served.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        difference = float((torch.as_tensor(logits).float() - expected).abs().max())
        assert difference <= PARITY_TOLERANCE, f"{model_type} on {name}: full depth differs by {difference:.2e}"
        result = served.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0] * len(probe))
        assert result.exit_layer == [LAYERS] * len(probe)
        assert result.label == expected.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        # DeBERTa-v2 (not v3): a convolution beside layer 1, absolute positions and token types as well.
        ("deberta-v2", {"conv_kernel_size": 3, "conv_act": "gelu", "position_biased_input": True,
                        "type_vocab_size": 2, "position_buckets": -1, "norm_rel_ebd": "none"}),
        # ModernBERT pooling the mean for its head, with biases in its head's dense and norm.
        ("modernbert", {"classifier_pooling": "mean", "classifier_bias": True, "norm_bias": True}),
    ],
    ids=["deberta-v2-convolution", "modernbert-mean-pooling"],
)  # fmt: skip
def test_architecture_variants_answer_as_the_classifier(tmp_path: Path, model_type: str, overrides: Any) -> None:
    source = write_classifier(tmp_path / "classifier", model_type, **overrides)
    texts, _ = toy_texts(120)
    log = convert(quick(source, write_lines(tmp_path / "texts.txt", texts), tmp_path / "out"))
    assert log.full_depth_max_logit_difference <= PARITY_TOLERANCE
    model = load_model(tmp_path / "out")
    if model_type == "deberta-v2":
        assert model.backbone.encoder.conv is not None
    else:
        assert model.config.final_pooling == "mean" and model.final_classifier.norm is not None
    probe = texts[:9]
    expected = classifier_logits(source, probe)
    tokenizer = load_tokenizer(tmp_path / "out")
    batch = pad_batch(tokenize(tokenizer, probe, None, 48), int(tokenizer.pad_token_id))
    for served in (model, load_backend(model, "onnxruntime", cache_dir=tmp_path / "cache")):
        with torch.inference_mode():
            logits = served.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        assert float((torch.as_tensor(logits).float() - expected).abs().max()) <= PARITY_TOLERANCE
        assert_alone_equals_batched(model, served, tokenizer)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_label_free_off_ramps_learn_the_classifier_where_early_layers_suffice(tmp_path: Path, model_type: str) -> None:
    source = write_classifier(tmp_path / "classifier", model_type, fine_tune_steps=60)
    texts, _ = toy_texts(600, seed=2)
    log = convert(quick(source, write_lines(tmp_path / "texts.txt", texts), tmp_path / "out", epochs=30))
    full = log.per_layer_agreement_with_full_depth
    assert full[-1] == 1.0
    # A single word decides the toy task: the first off-ramp already agrees with the classifier far above the
    # share of its majority answer (what an off-ramp that learned nothing would score at best).
    model = load_model(tmp_path / "out")
    tokenizer = load_tokenizer(tmp_path / "out")
    held_texts, _ = toy_texts(200, seed=9)
    answers = classifier_logits(source, held_texts).argmax(dim=-1)
    majority = max(float(answers.float().mean()), 1 - float(answers.float().mean()))
    assert full[0] > max(0.9, majority), f"layer 1 agrees {full[0]:.2f}, majority share {majority:.2f}"
    balanced = model.config.preset("balanced")
    assert balanced.accuracy is not None and balanced.accuracy >= 0.985
    assert balanced.expected_saving is not None and balanced.expected_saving > 0.3
    # The exit loop on this architecture: rows leaving at mixed layers, compacted or not, each row alone (the
    # batch-1 path) as in the batch, and ONNX Runtime's step graphs leaving where torch leaves.
    assert_compacts_mixed_thresholds(model, model, tokenizer)
    assert_alone_equals_batched(model, model, tokenizer)
    assert_matches_torch(model, load_backend(model, "onnxruntime", cache_dir=tmp_path / "cache"), tokenizer)
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "agreement with full depth" in card and str(source) in card


def test_labels_objective_trains_on_the_labels_of_a_tsv(tmp_path: Path) -> None:
    source = write_classifier(tmp_path / "classifier", "bert", fine_tune_steps=60)
    texts, labels = toy_texts(300, seed=4)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True)))
    log = convert(quick(source, tsv, tmp_path / "out", objective="labels", epochs=20, calibrate_by="accuracy"))
    assert log.stage2["objective"] == "cross-entropy"
    assert log.per_layer_accuracy is not None and log.per_layer_accuracy[0] > 0.8
    # Asked to, the presets are calibrated by held-out accuracy (as `deebert calibrate`), and say so.
    model = load_model(tmp_path / "out")
    assert log.presets_calibrated_by == model.config.presets_calibrated_by == "accuracy"
    full_depth_accuracy = log.per_layer_accuracy[-1]
    for preset, logged in zip(model.config.presets, log.presets, strict=True):
        assert preset.accuracy >= full_depth_accuracy - preset.max_accuracy_drop - 1e-9
        assert 0.0 <= logged["agreement"] <= 1.0
    assert "calibrated **by accuracy**" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    # Both at once: the head's distribution and the labels, summed per off-ramp.
    mixed = convert(quick(source, tsv, tmp_path / "mixed", objective="mixed", epochs=20))
    assert mixed.stage2["objective"] == "kl-from-final-classifier+cross-entropy"
    assert mixed.per_layer_accuracy is not None and mixed.per_layer_accuracy[0] > 0.8
    assert mixed.presets_calibrated_by == "agreement"


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_gets_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_classifier(tmp_path / "classifier", "bert")
    out = str(tmp_path / "out")
    empty = write_lines(tmp_path / "empty.txt", [])
    assert "no texts" in one_error_line(
        ["convert", "--classifier", str(source), "--texts", str(empty), "--output", out], capsys
    )
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\nfun\t1\n")
    err = one_error_line(
        ["convert", "--classifier", str(source), "--texts", str(tsv), "--text-columns", "review", "--output", out],
        capsys,
    )
    assert "review" in err
    encoder = tmp_path / "encoder"
    write_vocab(encoder)
    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(str(encoder))
    texts = write_lines(tmp_path / "texts.txt", toy_texts(40)[0])
    err = one_error_line(["convert", "--classifier", str(encoder), "--texts", str(texts), "--output", out], capsys)
    assert "not a sequence classifier" in err
    missing = one_error_line(
        ["convert", "--classifier", str(source), "--texts", str(tmp_path / "nope.txt"), "--output", out], capsys
    )
    assert "no such file" in missing
    unlabelled = one_error_line(
        ["convert", "--classifier", str(source), "--texts", str(texts), "--output", out, "--calibrate-by", "accuracy"],
        capsys,
    )
    assert "--calibrate-by accuracy needs a 'label' column" in unlabelled


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    config = AutoConfig.for_model(
        "mpnet",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["MPNetForSequenceClassification"],
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ConvertError, match="supports bert, roberta, xlm-roberta, electra, distilbert"):
        load_classifier(str(tmp_path / "m"))


def test_serving_a_plain_classifier_says_how_to_convert_it(tmp_path: Path) -> None:
    source = write_classifier(tmp_path / "classifier", "bert")
    with pytest.raises(CheckpointError, match="deebert convert --classifier"):
        require_deebert(source, str(source))
    config = json.loads((source / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_a_multi_label_classifier_converts_and_serves_every_label_on_both_apis(tmp_path: Path) -> None:
    emotions = ("joy", "anger", "fear")
    source = write_classifier(tmp_path / "classifier", "bert", labels=emotions)
    texts, _ = toy_texts(160)
    log = convert(quick(source, write_lines(tmp_path / "texts.txt", texts), tmp_path / "out"))
    assert log.full_depth_max_logit_difference <= PARITY_TOLERANCE
    assert log.stage2["objective"] == "bce-from-final-sigmoids" and log.per_layer_agreement_with_full_depth[-1] == 1.0
    model = load_model(tmp_path / "out")
    assert model.config.exit_criterion == "label-entropy" and model.config.labels == list(emotions)
    logits = classifier_logits(source, texts[:4])
    expected = torch.sigmoid(logits)

    async def ask() -> tuple[dict[str, Any], list[Any], dict[str, Any], list[Any]]:
        engine = Engine(model, load_tokenizer(tmp_path / "out"), torch.device("cpu"))
        async with serving(make_app(engine)) as client:
            ours = await client.post("/v1/classify", json={"texts": texts[:4]}, headers={"X-Exit-Threshold": "0"})
            tei = await client.post(
                "/predict", json={"inputs": [[t] for t in texts[:4]]}, headers={"X-Exit-Threshold": "0"}
            )
            info = await client.get("/v1/model")
            raw = await client.post("/predict", json={"inputs": texts[0], "raw_scores": True})
        return ours.json(), tei.json(), info.json(), raw.json()

    ours, tei, info, raw = asyncio.run(ask())
    # TEI's raw scores of a multi-label model are its logits; the default threshold may exit early, so they
    # come from whichever off-ramp answered: at full depth they would be the classifier's.
    assert len(raw) == len(emotions) and all(math.isfinite(item["score"]) for item in raw)
    assert info["multi_label"] is True and info["exit_criterion"] == "label-entropy"
    for row, result in enumerate(ours["results"]):
        scores = [result["probabilities"][name] for name in emotions]
        assert scores == pytest.approx(expected[row].tolist(), abs=1e-5)
        assert result["labels_on"] == [name for name, p in zip(emotions, scores, strict=True) if p >= 0.5]
        assert 0.0 <= result["entropy"] <= math.log(2) + 1e-6 and result["exit_layer"] == LAYERS
        assert {item["label"]: item["score"] for item in tei[row]} == pytest.approx(
            dict(zip(emotions, scores, strict=True)), abs=1e-5
        )


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
# One of each layer naming (RoBERTa, XLM-R and ELECTRA trace as BERT does): the feed-forward pair is found by name.
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "deberta-v2", "modernbert"])
def test_static_int8_serves_every_architecture_on_both_runtimes(tmp_path: Path, model_type: str) -> None:
    """Activation ranges from the converted model's texts; one QDQ graph per step on ONNX Runtime and OpenVINO,
    each row answered alone as in the batch, and close to fp32 (not equal: that is int8); dynamic int8 too."""
    source = write_classifier(tmp_path / "classifier", model_type)
    texts, _ = toy_texts(120)
    convert(quick(source, write_lines(tmp_path / "texts.txt", texts), tmp_path / "out"))
    model = load_model(tmp_path / "out")
    tokenizer = load_tokenizer(tmp_path / "out")
    model.config.int8_ranges = calibrate_ranges(model, tokenize(tokenizer, texts[:40], None, 48))
    probe = texts[:6]
    batch = pad_batch(tokenize(tokenizer, probe, None, 48), int(tokenizer.pad_token_id))
    with torch.inference_mode():
        fp32 = model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids).softmax(-1)
    for backend in ("onnxruntime", "openvino"):
        served = load_backend(model, backend, "int8-static", tmp_path / "cache", threads=1)
        ops = {node.op_type for node in onnx.load(str(served.directory / layer_file(2))).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, f"{model_type} on {backend}: no QDQ nodes"
        # The threshold sits in the widest gap between this runtime's entropies, so the last digits a batch
        # shape changes cannot move a row across it.
        logits = torch.as_tensor(
            served.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        )
        entropies = exit_rule.entropy_from_logits(logits.float())[1].flatten().sort().values
        widest = int((entropies[1:] - entropies[:-1]).argmax())
        threshold = float(entropies[widest] + entropies[widest + 1]) / 2
        together = served.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * len(probe))
        for row, text in enumerate(probe):
            one = pad_batch(tokenize(tokenizer, [text], None, 48), int(tokenizer.pad_token_id))
            alone = served.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold])
            assert (alone.label[0], alone.exit_layer[0]) == (together.label[row], together.exit_layer[row])
        int8 = torch.as_tensor(served.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids))
        torch.testing.assert_close(int8.float().softmax(-1), fp32, atol=0.1, rtol=0)
    # Dynamic int8 (ONNX Runtime) quantizes the same feed-forward pair, and nothing else, in each layer graph.
    dynamic = load_backend(model, "onnxruntime", "int8", tmp_path / "cache", threads=1)
    ops = [node.op_type for node in onnx.load(str(dynamic.directory / layer_file(2))).graph.node]
    assert ops.count("MatMulInteger") == 2, f"{model_type}: {ops.count('MatMulInteger')} products quantized"
    int8 = torch.as_tensor(dynamic.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids))
    torch.testing.assert_close(int8.float().softmax(-1), fp32, atol=0.1, rtol=0)
