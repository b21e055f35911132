"""The OpenVINO backend: the same exits, labels and probabilities as PyTorch, on tiny BERT and RoBERTa."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from model.backends import BackendError, load_backend, pick_backend
from model.onnx_backend import cache_entry, check_export
from model.onnx_export import layer_file, model_digest
from model.openvino_backend import OpenVinoDeeBert, load_openvino_model, supported_precisions
from tests.helpers import (
    SENTENCES,
    assert_alone_equals_batched,
    assert_compacts_mixed_thresholds,
    assert_matches_torch,
    encode,
    tiny_model,
)

pytest.importorskip("openvino")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, OpenVinoDeeBert]:
    """A tiny random model (mean pooling) and its OpenVINO graphs compiled in f32."""
    model = tiny_model(request.param, pooling="mean")
    return model, load_openvino_model(model, "fp32", tmp_path_factory.mktemp(f"ov-{request.param}"), threads=1)


def test_the_graphs_are_standard_onnx_with_a_manifest(pair) -> None:  # type: ignore[no-untyped-def]
    import onnx

    model, exported = pair
    manifest = exported.manifest
    assert manifest.runtime == "openvino" and manifest.fusions == {}
    assert manifest.layer_mask_input == "attention_mask"
    assert manifest.parity["max_abs_logit_difference"] < 1e-4 and manifest.parity["same_labels_every_layer"]
    domains = {node.domain for node in onnx.load(str(exported.directory / layer_file(2))).graph.node}
    assert domains <= {"", "ai.onnx"}, "no ONNX Runtime contrib operators"
    assert check_export(exported.directory, model_digest(model), "fp32", "openvino") == manifest
    assert exported.backend == "openvino" and exported.precision == "float32"


def test_exit_layers_labels_and_probabilities_match_torch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_matches_torch(*pair, tokenizer)


def test_mixed_thresholds_with_and_without_compaction(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_compacts_mixed_thresholds(*pair, tokenizer)


def test_a_row_answers_the_same_alone_or_in_a_batch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_alone_equals_batched(*pair, tokenizer)


def test_length_buckets_pad_without_changing_answers(monkeypatch, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="first")
    monkeypatch.setenv("DEEBERT_OPENVINO_LENGTH_BUCKET", "1")
    exact = load_openvino_model(model, "fp32", tmp_path, threads=1)
    monkeypatch.setenv("DEEBERT_OPENVINO_LENGTH_BUCKET", "16")
    bucketed = load_openvino_model(model, "fp32", tmp_path, threads=1)
    assert (exact.length_bucket, bucketed.length_bucket) == (1, 16)
    batch = encode(tokenizer)
    state = bucketed.start(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    assert state.attention_mask.shape[1] % 16 == 0  # what the graphs see: whole buckets
    for threshold in (0.0, 0.05, 1e9):
        thresholds = [threshold] * len(SENTENCES)
        a = exact.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
        b = bucketed.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
        assert (a.exit_layer, a.label) == (b.exit_layer, b.label)
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-5, rtol=0)
        one = encode(tokenizer, [SENTENCES[1]])
        alone = bucketed.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold])
        assert (alone.exit_layer[0], alone.label[0]) == (a.exit_layer[1], a.label[1])


@pytest.mark.skipif("bf16" not in supported_precisions(), reason="OpenVINO reports no BF16 on this CPU")
def test_bf16_stays_close_to_fp32(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="mean")
    bf16 = load_backend(model, "openvino", "bf16", tmp_path, threads=1)
    assert bf16.precision == "bfloat16"
    batch = encode(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.token_type_ids)
    with torch.inference_mode():
        expected = model.plain_forward(*args)
    # bf16 keeps 8 bits of mantissa: logits of a tiny random model stay within a few hundredths.
    torch.testing.assert_close(bf16.plain_forward(*args), expected, atol=0.05, rtol=0.05)
    # The step graphs in bf16: every off-ramp stays as close, and the exit loop with compaction and mixed
    # per-row thresholds answers from the same graphs.
    with torch.inference_mode():
        ramps = model.all_off_ramp_logits(*args)
    torch.testing.assert_close(bf16.all_off_ramp_logits(*args).float(), ramps, atol=0.05, rtol=0.05)
    mixed = bf16.infer(*args, [0.0, 1000.0] * (len(batch.input_ids) // 2) + [0.0] * (len(batch.input_ids) % 2))
    assert mixed.exit_layer[1::2] == [1] * (len(batch.input_ids) // 2)
    assert set(mixed.exit_layer[::2]) == {model.config.num_layers}


def test_the_cache_compiles_once_and_rebuilds_a_corrupt_file(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    first = load_openvino_model(model, "fp32", tmp_path, threads=1)
    assert first.directory == cache_entry(tmp_path, model_digest(model), "fp32", "openvino")
    assert "/" not in first.directory.name
    stamp = (first.directory / layer_file(2)).stat().st_mtime_ns
    again = load_openvino_model(model, "fp32", tmp_path, threads=1)
    assert (again.directory / layer_file(2)).stat().st_mtime_ns == stamp
    (first.directory / layer_file(2)).write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        load_openvino_model(model, "fp32", tmp_path, threads=1)
    assert "corrupt" in caplog.text and "exporting again" in caplog.text
    # The ONNX Runtime cache of the same weights is another entry: neither runtime reads the other's graphs.
    assert cache_entry(tmp_path, model_digest(model), "fp32") != first.directory


def test_openvino_checks_its_device_and_precision() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_backend("openvino", cpu, torch.float32) == "openvino"
    with pytest.raises(BackendError, match="runs on the CPU"):
        pick_backend("openvino", cuda, torch.float32)
    with pytest.raises(BackendError, match="fp32 or bf16"):
        load_backend(tiny_model("bert"), "openvino", "int8")
