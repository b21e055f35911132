"""Static int8: ranges stored in the checkpoint, one QDQ graph on ONNX Runtime and OpenVINO, the same answer
at every batch size."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from model.backends import load_backend
from model.int8 import QuantizationError, calibrate_ranges, check_ranges
from model.onnx_export import ExportError, layer_file
from model.tokenization import tokenize
from tests.helpers import SENTENCES, encode, sentiment_rows, tiny_model

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def calibrated(tokenizer) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="mean")
    texts = [row[0] for row in sentiment_rows(40, seed=5)]
    model.config.int8_ranges = calibrate_ranges(model, tokenize(tokenizer, texts, None, model.config.max_length))
    return model


def test_all_quantizes_attention_projections_too(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    encoded = tokenize(tokenizer, ["a fine film"], None, model.config.max_length)
    every = calibrate_ranges(model, encoded, ops="all")
    # q, k and v read one input; with the attention output and the feed-forward pair, 4 distinct inputs a layer
    assert every["ops"] == "all" and len(every["ranges"]) == 4 * model.num_layers


def test_ranges_cover_every_weight_product_and_check_their_graph_format(calibrated) -> None:  # type: ignore[no-untyped-def]
    stored = calibrated.config.int8_ranges
    ranges, ops = check_ranges(stored)
    assert ops == "ffn" and len(ranges) == 2 * calibrated.num_layers  # the feed-forward pair of each layer
    assert all(low <= high for low, high in ranges.values()) and stored["texts"] == 40
    with pytest.raises(QuantizationError, match="no int8 activation ranges"):
        check_ranges({})
    with pytest.raises(QuantizationError, match="graph format"):
        check_ranges({**stored, "graph_format": -1})


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_qdq_graph_answers_the_same_at_every_batch_size(
    calibrated, tokenizer, tmp_path: Path, backend: str
) -> None:  # type: ignore[no-untyped-def]
    served = load_backend(calibrated, backend, "int8-static", tmp_path, threads=1)
    assert served.precision == "int8-static"
    ops = {node.op_type for node in onnx.load(str(served.directory / layer_file(2))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Attention" not in ops  # standard QDQ, unfused
    batch = encode(tokenizer)
    for threshold in (0.0, 0.05, 0.3):
        together = served.infer(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * len(SENTENCES)
        )
        for row, text in enumerate(SENTENCES):
            one = encode(tokenizer, [text])
            alone = served.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold])
            assert (alone.label[0], alone.exit_layer[0]) == (together.label[row], together.exit_layer[row])
            torch.testing.assert_close(alone.probabilities[0], together.probabilities[row], atol=1e-3, rtol=0)
    with torch.inference_mode():
        fp32 = calibrated.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids).softmax(-1)
    int8 = served.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids).softmax(-1)
    torch.testing.assert_close(int8, fp32, atol=0.1, rtol=0)  # close to fp32, not equal


def test_both_runtimes_read_the_same_graph_and_agree(calibrated, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ort = load_backend(calibrated, "onnxruntime", "int8-static", tmp_path, threads=1)
    ov = load_backend(calibrated, "openvino", "int8-static", tmp_path, threads=1)
    assert (ort.directory / layer_file(1)).read_bytes() == (ov.directory / layer_file(1)).read_bytes()
    batch = encode(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.token_type_ids)
    torch.testing.assert_close(ort.all_off_ramp_logits(*args), ov.all_off_ramp_logits(*args), atol=0.05, rtol=0)


def test_without_ranges_static_int8_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="deebert calibrate --precision int8-static --calibration-data"):
        load_backend(tiny_model("bert"), "openvino", "int8-static", tmp_path, threads=1)
