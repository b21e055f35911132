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
    assert_exit_graph_leaves_as_the_steps,
    assert_matches_torch,
    assert_refilled_matches_per_batch,
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
    # pooled as traced (multiply-and-sum): as one product in bf16 it moved logits beyond bf16's tolerance below
    assert manifest.pool_products is None
    assert manifest.layer_mask_input == "attention_mask"
    assert manifest.parity["max_abs_logit_difference"] < 1e-4 and manifest.parity["same_labels_every_layer"]
    domains = {node.domain for node in onnx.load(str(exported.directory / layer_file(2))).graph.node}
    assert domains <= {"", "ai.onnx"}, "no ONNX Runtime contrib operators"
    assert check_export(exported.directory, model_digest(model), "fp32", "openvino") == manifest
    assert exported.backend == "openvino" and exported.precision == "float32"


def test_exit_layers_labels_and_probabilities_match_torch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_matches_torch(*pair, tokenizer)


def test_a_lone_row_leaves_in_one_call_of_the_exit_graph_as_the_steps_would(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_exit_graph_leaves_as_the_steps(pair[1], tokenizer)


def test_refilled_between_layers_rows_answer_as_in_their_own_batches(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_refilled_matches_per_batch(*pair, tokenizer)


def test_what_a_caller_keeps_survives_the_next_call(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A layer graph's hidden states are read from its request's buffer (no copy), valid until it runs again;
    the plain graph's logits and an off-ramp's logits are the caller's own, unchanged by later calls."""
    _, exported = pair
    first, second = encode(tokenizer, SENTENCES[:2]), encode(tokenizer, SENTENCES[2:5])
    kept = exported.plain_forward(first.input_ids, first.attention_mask, first.token_type_ids)
    copy = kept.clone()
    exported.plain_forward(second.input_ids, second.attention_mask, second.token_type_ids)
    assert torch.equal(kept, copy)
    state = exported.run_layer(exported.start(first.input_ids, first.attention_mask, first.token_type_ids), 1)
    logits = exported.off_ramp_logits(state, 1)
    logits_copy = logits.clone()
    assert not state.hidden.flags.owndata  # a view of the request's output, not a copy
    exported.run_layer(exported.start(second.input_ids, second.attention_mask, second.token_type_ids), 1)
    assert torch.equal(logits, logits_copy)


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
    # The export's check of the exit graph allows for bf16's rounding: it passed, and the exit graph serves.
    parity = bf16.manifest.parity
    assert parity["exit_graph_same_exits"] is True and parity["exit_graph_thresholds_checked"] > 0
    assert bf16.exit_graph is not None
    batch = encode(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.token_type_ids)
    with torch.inference_mode():
        expected = model.plain_forward(*args)
    # bf16 keeps 8 bits of mantissa: logits of a tiny random model stay within a few hundredths.
    torch.testing.assert_close(bf16.plain_forward(*args), expected, atol=0.05, rtol=0.05)
    state = bf16.run_layer(bf16.start(*args), 1)  # hidden states handed over as their bfloat16 payload
    assert bf16.bf16_hidden and state.hidden is not None and state.hidden.dtype.name == "uint16"
    # The step graphs in bf16: every off-ramp stays as close, and the exit loop with compaction and mixed
    # per-row thresholds answers from the same graphs.
    with torch.inference_mode():
        ramps = model.all_off_ramp_logits(*args)
    torch.testing.assert_close(bf16.all_off_ramp_logits(*args).float(), ramps, atol=0.05, rtol=0.05)
    mixed = bf16.infer(*args, [0.0, 1000.0] * (len(batch.input_ids) // 2) + [0.0] * (len(batch.input_ids) % 2))
    assert mixed.exit_layer[1::2] == [1] * (len(batch.input_ids) // 2)
    assert set(mixed.exit_layer[::2]) == {model.config.num_layers}


def test_bf16_hands_hidden_states_to_the_next_layer_as_their_bfloat16_payload(pair) -> None:  # type: ignore[no-untyped-def]
    """In bf16 the layer graphs take and return hidden states as bfloat16 (uint16 payloads between the calls,
    compacted as any array); checked here on the f32-compiled graphs with bf16 edges, which any CPU runs: the
    same hidden states and logits as with f32 edges, to bfloat16's precision."""
    import numpy as np
    import openvino

    from model.openvino_backend import _OpenVinoGraph

    model, exported = pair
    assert not exported.bf16_hidden, "f32 keeps f32 edges"
    core, properties = openvino.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    rng = np.random.default_rng(0)
    rows, tokens, width = 3, 7, model.config.backbone["hidden_size"]
    hidden = rng.standard_normal((rows, tokens, width), dtype=np.float32)
    feeds = {"hidden_1": hidden, "attention_mask": np.ones((rows, tokens), np.int64)}
    feeds["pool_weights"] = np.full((rows, tokens, 1), 1 / tokens, np.float32)
    f32_edges = _OpenVinoGraph(core, exported.directory / layer_file(2), properties)
    bf16_edges = _OpenVinoGraph(core, exported.directory / layer_file(2), properties, bf16_hidden=True)
    payload = (hidden.view(np.uint32) >> 16).astype(np.uint16)  # hidden states rounded down to bfloat16
    rounded = (payload.astype(np.uint32) << 16).view(np.float32)
    expected_hidden, expected_logits = f32_edges.run({**feeds, "hidden_1": rounded})
    got_hidden, got_logits = bf16_edges.run({**feeds, "hidden_1": payload})
    assert got_hidden.dtype == np.uint16 and got_hidden.shape == (rows, tokens, width)
    decoded = (got_hidden.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(decoded, expected_hidden, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(got_logits, expected_logits, rtol=1e-5, atol=1e-5)
    # A compacted payload (rows and padding cut: not contiguous) is fed as well.
    cut_hidden, _ = bf16_edges.run({**{k: v[1:, :5] for k, v in feeds.items()}, "hidden_1": payload[1:, :5]})
    assert cut_hidden.shape == (rows - 1, 5, width)
    # The last layer graph returns logits only; the plain graph takes no hidden states: no bf16 ports there.
    last = _OpenVinoGraph(core, exported.directory / layer_file(model.config.num_layers), properties, True)
    assert last._bf16_outputs == frozenset() and last._bf16_inputs == {f"hidden_{model.config.num_layers - 1}"}


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
