"""The ONNX Runtime backend: the same exits, labels and probabilities as PyTorch, on tiny BERT and RoBERTa."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from model import exit_rule
from model.backends import BackendError, load_backend, pick_backend
from model.checkpoint import load_model
from model.onnx_backend import OnnxDeeBert, cache_entry, check_export, export, load_onnx_model, token_indices
from model.onnx_export import (
    EXIT_FILE,
    INT8_SELECTION,
    PAD_INDEX,
    PLAIN_FILE,
    POOL_WEIGHTS,
    UNPAD_INDEX,
    ExportError,
    Manifest,
    Quantization,
    export_graphs,
    layer_file,
    model_digest,
    pack_tokens,
    packed_layer_file,
)
from tests.helpers import (
    SENTENCES,
    assert_alone_equals_batched,
    assert_compacts_mixed_thresholds,
    assert_exit_graph_leaves_as_the_steps,
    assert_matches_torch,
    assert_refilled_matches_per_batch,
    encode,
    tiny_model,
    write_vocab,
)

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, OnnxDeeBert]:
    """A tiny random model (mean pooling) and its exported fp32 graphs."""
    model = tiny_model(request.param, pooling="mean")
    directory = tmp_path_factory.mktemp(f"onnx-{request.param}") / "fp32"
    return model, export(model, directory, "fp32", threads=1)


def test_the_manifest_records_fusions_and_parity(pair) -> None:  # type: ignore[no-untyped-def]
    model, exported = pair
    manifest = exported.manifest
    assert manifest.fusions.get("Attention") == model.num_layers  # every layer's attention fused
    assert manifest.parity["max_abs_logit_difference"] < 1e-4
    assert manifest.parity["same_labels_every_layer"] is True
    assert manifest.parity["exit_graph_same_exits"] is True  # checked at export, each parity row alone
    assert manifest.parity["exit_graph_thresholds_checked"] >= model.num_layers
    assert manifest.parity["exit_graph_max_abs_logit_difference"] < 1e-4
    assert manifest.opset == 17 and manifest.precision == "fp32"
    assert check_export(exported.directory, model_digest(model), "fp32") == manifest


def test_fused_graphs_pool_the_mean_by_one_product(pair) -> None:  # type: ignore[no-untyped-def]
    """Every off-ramp's multiply-and-sum became one matrix product after fusion (`pool_by_product`), in the step
    graphs, the plain graph and every level of the exit graph; the layers' parity with torch is the tests
    above and below."""
    import onnx

    model, exported = pair
    assert exported.manifest.pool_products == model.num_layers
    assert exported.manifest.fusions.get("Attention") == model.num_layers  # still fused after the rewrite
    for name in [layer_file(i) for i in range(1, model.num_layers + 1)] + ["plain.onnx", EXIT_FILE]:
        graph = onnx.load(str(exported.directory / name), load_external_data=False).graph
        nodes = list(_every_node(graph))
        assert not [n for n in nodes if n.op_type == "Mul" and POOL_WEIGHTS in n.input], name
        products = [n for n in nodes if n.op_type == "MatMul" and n.input[0].endswith(f"{POOL_WEIGHTS}_row")]
        assert len(products) == (model.num_layers if name == EXIT_FILE else 1), name


def test_fused_fp32_layers_have_a_packed_form_and_batches_with_padding_take_it(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Beside every layer graph, its packed form (`pack_tokens`): it takes the token indices and attends with
    MultiHeadAttention instead of the fused Attention. A call with much padding runs the packed layers, one with
    little (or a lone row) the padded ones; the plain graph and the exit graph keep fused attention. Answers
    against torch, alone and in batches of mixed lengths, with compaction and refills, are the tests around."""
    import onnx

    model, exported = pair
    assert exported.manifest.packed_layers == model.num_layers
    for number in range(1, model.num_layers + 1):
        packed = onnx.load(str(exported.directory / packed_layer_file(number))).graph
        assert {UNPAD_INDEX, PAD_INDEX} <= {i.name for i in packed.input}
        operators = [n.op_type for n in packed.node]
        assert "MultiHeadAttention" in operators and "Attention" not in operators
    assert all(layer is not None and layer.takes_token_indices for layer in exported.packed_layers)
    for name in (layer_file(1), PLAIN_FILE, EXIT_FILE):
        graph = onnx.load(str(exported.directory / name), load_external_data=False).graph
        assert UNPAD_INDEX not in {i.name for i in graph.input}
        assert [n for n in _every_node(graph) if n.op_type == "Attention"], name

    ran: list[bool] = []
    original = exported.run_layer

    def spy(state, layer_number):  # type: ignore[no-untyped-def]
        ran.append(state.packed)
        return original(state, layer_number)

    exported.run_layer = spy
    try:
        mixed = encode(tokenizer, ["dull", "the plot was not very fun but the cast was brilliant and great"])
        exported.infer(mixed.input_ids, mixed.attention_mask, mixed.token_type_ids, [1e-6, 1e-6])
        assert ran and ran[0]  # padding is most of this batch's positions (once a row leaves, the other is alone)
        ran.clear()
        alike = encode(tokenizer, ["the movie was good", "the film was bad"])
        assert int(alike.attention_mask.sum()) == alike.attention_mask.numel()  # no padding
        exported.infer(alike.input_ids, alike.attention_mask, alike.token_type_ids, [1e-6, 1e-6])
        assert ran and not any(ran)
    finally:
        del exported.run_layer


def test_a_full_depth_batch_with_much_padding_runs_the_packed_layers(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """At threshold 0 a batch takes one call of the fused full graph, except when padding is much of it: then the
    layers run packed, one by one, to the same answers as torch's full depth."""
    model, exported = pair
    ran: list[bool] = []
    plain_calls: list[int] = []
    run_layer, plain_forward = exported.run_layer, exported.plain_forward

    def spy_layer(state, layer_number):  # type: ignore[no-untyped-def]
        ran.append(state.packed)
        return run_layer(state, layer_number)

    def spy_plain(input_ids, *args):  # type: ignore[no-untyped-def]
        plain_calls.append(input_ids.shape[0])
        return plain_forward(input_ids, *args)

    exported.run_layer, exported.plain_forward = spy_layer, spy_plain
    try:
        mixed = encode(tokenizer, ["dull", "the plot was not very fun but the cast was brilliant and great"])
        answers = exported.infer(mixed.input_ids, mixed.attention_mask, mixed.token_type_ids, [0.0, 0.0])
        assert ran == [True] * model.num_layers and not plain_calls
        assert answers.exit_layer == [model.num_layers] * 2
        with torch.no_grad():
            expected = model.infer(mixed.input_ids, mixed.attention_mask, mixed.token_type_ids, [0.0, 0.0])
        assert torch.allclose(answers.probabilities, expected.probabilities, atol=1e-4)
        ran.clear()
        alike = encode(tokenizer, ["the movie was good", "the film was bad"])
        exported.infer(alike.input_ids, alike.attention_mask, alike.token_type_ids, [0.0, 0.0])
        assert not ran and plain_calls == [2]
    finally:
        del exported.run_layer, exported.plain_forward


def test_batches_stay_whole_only_when_every_layer_packs(pair) -> None:  # type: ignore[no-untyped-def]
    """A layer without a packed form runs padded; the server then keeps splitting batches by length."""
    import dataclasses

    model, exported = pair
    assert exported.packs_tokens
    files = {name: digest for name, digest in exported.manifest.files.items() if name != packed_layer_file(2)}
    partial = OnnxDeeBert(model.config, exported.directory, dataclasses.replace(exported.manifest, files=files), 1)
    assert partial.packed_layers[1] is None and partial.packed_layers[0] is not None
    assert not partial.packs_tokens


def test_a_first_token_pooling_model_runs_packed_and_matches_torch(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="first")
    exported = export(model, tmp_path / "fp32", "fp32", threads=1)
    assert exported.manifest.packed_layers == model.num_layers
    assert_matches_torch(model, exported, tokenizer)
    assert_alone_equals_batched(model, exported, tokenizer)


def test_token_indices_pack_and_pad_right_padded_rows() -> None:
    lengths = np.array([3, 1, 2], np.int32)
    unpad_index, pad_index = token_indices(lengths, 3)
    assert unpad_index.tolist() == [0, 1, 2, 3, 6, 7]  # the real tokens' places in the [3 × 3] layout
    assert pad_index.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 4]  # padding reads its row's first token
    assert unpad_index.dtype == pad_index.dtype == np.int64
    padded = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
    packed = padded.reshape(-1, 4)[unpad_index]
    again = packed[pad_index].reshape(3, 3, 4)
    real = np.arange(3)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(again[real], padded[real])


def test_graphs_packing_does_not_know_are_left_as_they_were(tmp_path: Path) -> None:
    """OpenVINO's graphs are cut as traced (no fused Attention), dynamic int8's stay padded (its activation
    scale spans the whole tensor): `pack_tokens` leaves a graph it cannot rewrite unchanged."""
    import onnx

    model = tiny_model("bert", pooling="mean")
    manifest = export_graphs(model, tmp_path / "ov", "fp32", runtime="openvino")
    assert manifest.packed_layers is None
    graph = onnx.load(str(tmp_path / "ov" / layer_file(2))).graph
    before = graph.SerializeToString()
    assert pack_tokens(graph) is False
    assert graph.SerializeToString() == before
    int8 = export_graphs(model, tmp_path / "int8", "int8")
    assert int8.packed_layers == 0
    assert not list((tmp_path / "int8").glob("*.packed.onnx"))
    # The same fused layer packs (dynamic int8 is left padded by choice, not because it cannot be rewritten)...
    packable = onnx.load(str(tmp_path / "int8" / layer_file(2))).graph
    assert pack_tokens(packable) is True
    # ...but not with an operator between attention and the layer's output that is not token-wise.
    unpacked = onnx.load(str(tmp_path / "int8" / layer_file(2))).graph
    gelu = next(n for n in unpacked.node if n.op_type in ("BiasGelu", "FastGelu", "Gelu"))
    gelu.op_type = "Softmax"
    before = unpacked.SerializeToString()
    assert pack_tokens(unpacked) is False
    assert unpacked.SerializeToString() == before


def _every_node(graph):  # type: ignore[no-untyped-def]
    """The nodes of `graph` and of every subgraph nested in it (the exit graph's `If` branches)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _every_node(attribute.g)


def test_exit_layers_labels_and_probabilities_match_torch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_matches_torch(*pair, tokenizer)


def test_refilled_between_layers_rows_answer_as_in_their_own_batches(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_refilled_matches_per_batch(*pair, tokenizer)


def test_mixed_thresholds_leave_at_different_layers_with_compaction(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_compacts_mixed_thresholds(*pair, tokenizer)


def test_a_row_answers_the_same_alone_or_in_a_batch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert_alone_equals_batched(*pair, tokenizer)


def test_a_lone_row_padded_or_not_answers_the_same(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """An unpadded batch of one takes its mask and pooling inputs from a per-length cache; a padded one
    computes them: both give the same answer, and the cached inputs equal the computed ones."""
    _, exported = pair
    for text in SENTENCES[:3]:
        one = encode(tokenizer, [text])
        length = one.input_ids.shape[1]
        padded_ids = torch.nn.functional.pad(one.input_ids, (0, 3), value=tokenizer.pad_token_id)
        padded_mask = torch.nn.functional.pad(one.attention_mask, (0, 3), value=0)
        padded_types = torch.nn.functional.pad(one.token_type_ids, (0, 3), value=0)
        for threshold in (0.0, 0.05, 1e9):
            unpadded = exported.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold])
            padded = exported.infer(padded_ids, padded_mask, padded_types, [threshold])
            assert (padded.exit_layer, padded.label) == (unpadded.exit_layer, unpadded.label)
            torch.testing.assert_close(padded.probabilities, unpadded.probabilities, atol=1e-5, rtol=0)
        cached = exported.start(one.input_ids, one.attention_mask, one.token_type_ids)
        assert length in exported._unpadded_inputs  # the cache, keyed by length
        computed = exported._compute_mask_inputs(one.attention_mask.numpy())
        assert (cached.lengths == computed[0]).all()
        assert cached.pool_weights is not None and computed[1] is not None
        assert (cached.pool_weights == computed[1]).all()
        assert not cached.pool_weights.flags.writeable  # shared between calls: read-only


def test_a_lone_row_leaves_in_one_call_of_the_exit_graph_as_the_steps_would(pair, tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, exported = pair
    assert_exit_graph_leaves_as_the_steps(exported, tokenizer)
    graph = exported.exit_graph
    calls = []
    run = graph.run
    monkeypatch.setattr(graph, "run", lambda feeds: calls.append(1) or run(feeds))
    for layer in exported.layers:
        monkeypatch.setattr(layer, "run", lambda feeds: pytest.fail("a step graph ran for a lone row"))
    one = encode(tokenizer, SENTENCES[:1])
    exported.infer(one.input_ids, one.attention_mask, one.token_type_ids, [0.3])
    assert calls == [1]


@pytest.mark.parametrize(
    ("field", "message"), [("pool_products", "one matrix product"), ("packed_layers", "packed tokens")]
)
def test_a_fused_cache_from_before_a_graph_rewrite_is_exported_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, message: str
) -> None:
    """A manifest without the record of a later rewrite of the fused graphs (mean pooling as one product, the
    packed layers) was written before it: the cache entry is exported again, with a warning saying why."""
    model = tiny_model("bert", pooling="mean")
    directory = load_onnx_model(model, "fp32", tmp_path, threads=1).directory
    manifest = Manifest.read(directory)
    setattr(manifest, field, None)  # as a manifest written before the field existed reads
    manifest.write(directory)
    with pytest.raises(ExportError, match=message):
        check_export(directory, model_digest(model), "fp32")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        again = load_onnx_model(model, "fp32", tmp_path, threads=1)
    assert message in caplog.text and getattr(again.manifest, field) == model.num_layers


@pytest.mark.parametrize("name", ["max-prob", "patience"])
def test_rules_without_a_graph_form_take_the_steps_for_a_lone_row(pair, tokenizer, monkeypatch, name: str) -> None:  # type: ignore[no-untyped-def]
    """The exit graph decides by entropy: under another rule a lone row runs the step graphs, as torch does."""
    model, exported = pair
    monkeypatch.setattr(exported.exit_graph, "run", lambda feeds: pytest.fail("the exit graph ran"))
    rule = exit_rule.get_criterion(name)
    for text in SENTENCES[:4]:
        one = encode(tokenizer, [text])
        args = (one.input_ids, one.attention_mask, one.token_type_ids)
        for threshold in rule.default_grid(2, model.num_layers)[1:6]:
            expected = model.infer(*args, [threshold], criterion=rule)
            got = exported.infer(*args, [threshold], criterion=rule)
            assert (got.exit_layer, got.label) == (expected.exit_layer, expected.label)


def test_an_exit_graph_that_disagreed_at_export_is_not_served(tmp_path: Path, tokenizer, caplog) -> None:  # type: ignore[no-untyped-def]
    """If the export's parity check found the exit graph leaving elsewhere than the step graphs, lone rows take
    the step graphs (with a warning), and answer as torch does."""
    model = tiny_model("bert")
    exported = export(model, tmp_path / "fp32", "fp32", threads=1)
    manifest = exported.manifest
    manifest.parity["exit_graph_same_exits"] = False
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        reloaded = OnnxDeeBert(model.config, exported.directory, manifest, threads=1)
    assert reloaded.exit_graph is None and "lone rows take the step graphs" in caplog.text
    one = encode(tokenizer, SENTENCES[:1])
    args = (one.input_ids, one.attention_mask, one.token_type_ids, [0.3])
    assert reloaded.infer(*args).exit_layer == model.infer(*args).exit_layer


def test_a_cache_without_the_exit_graph_is_exported_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Caches written before the exit graph existed are rebuilt, with a warning saying why."""
    model = tiny_model("bert")
    directory = load_onnx_model(model, "fp32", tmp_path, threads=1).directory
    manifest = Manifest.read(directory)
    del manifest.files[EXIT_FILE]
    manifest.write(directory)
    (directory / EXIT_FILE).unlink()
    with pytest.raises(ExportError, match="exit graph"):
        check_export(directory, model_digest(model), "fp32")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        again = load_onnx_model(model, "fp32", tmp_path, threads=1)
    assert "exit graph" in caplog.text and "exporting again" in caplog.text
    assert again.directory == directory and again.exit_graph is not None and (directory / EXIT_FILE).is_file()


@pytest.mark.parametrize("name", ["max-prob", "patience"])
def test_other_exit_criteria_run_the_same_on_onnxruntime(pair, tokenizer, name: str) -> None:  # type: ignore[no-untyped-def]
    model, exported = pair
    rule = exit_rule.get_criterion(name)
    batch = encode(tokenizer)
    for threshold in rule.default_grid(2, model.num_layers)[:6]:
        thresholds = [threshold] * len(SENTENCES)
        expected = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, criterion=rule)
        got = exported.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, criterion=rule)
        assert (got.exit_layer, got.label) == (expected.exit_layer, expected.label)


def test_plain_forward_and_all_off_ramps_match_torch(pair, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, exported = pair
    batch = encode(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.token_type_ids)
    with torch.inference_mode():
        torch.testing.assert_close(exported.plain_forward(*args), model.plain_forward(*args), atol=1e-4, rtol=0)
    torch.testing.assert_close(exported.all_off_ramp_logits(*args), model.all_off_ramp_logits(*args), atol=1e-4, rtol=0)


def test_the_cache_exports_once_and_rebuilds_a_corrupt_file(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    first = load_onnx_model(model, "fp32", tmp_path, threads=1)
    assert first.directory == cache_entry(tmp_path, model_digest(model), "fp32")
    stamp = (first.directory / layer_file(2)).stat().st_mtime_ns
    again = load_onnx_model(model, "fp32", tmp_path, threads=1)  # cached: nothing exported
    assert (again.directory / layer_file(2)).stat().st_mtime_ns == stamp
    (first.directory / layer_file(2)).write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        rebuilt = load_onnx_model(model, "fp32", tmp_path, threads=1)
    assert "corrupt" in caplog.text and "exporting again" in caplog.text
    batch = encode_ids(model)
    torch.testing.assert_close(rebuilt.plain_forward(*batch), model.plain_forward(*batch).detach(), atol=1e-4, rtol=0)
    (rebuilt.directory / "manifest.json").write_text("{ truncated")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        load_onnx_model(model, "fp32", tmp_path, threads=1)
    assert "not a DeeBERT export manifest" in caplog.text


def test_other_weights_get_their_own_cache_entry(tmp_path: Path) -> None:
    model = tiny_model("bert")
    other = tiny_model("bert")
    with torch.no_grad():
        other.off_ramps[0].dense.bias.add_(1.0)
    assert model_digest(model) != model_digest(other)
    directory = load_onnx_model(model, "fp32", tmp_path, threads=1).directory
    with pytest.raises(ExportError, match="other weights"):
        check_export(directory, model_digest(other), "fp32")


def test_int8_exports_and_answers(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="mean")
    exported = export(model, tmp_path / "int8", "int8", quantization=Quantization(), threads=1)
    assert exported.precision == "int8" and exported.manifest.quantization is not None
    import onnx

    layer_ops = {node.op_type for node in onnx.load(str(exported.directory / layer_file(2))).graph.node}
    assert layer_ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}  # really quantized
    batch = encode(tokenizer)
    result = exported.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0] * len(SENTENCES))
    assert result.exit_layer == [model.num_layers] * len(SENTENCES)
    assert torch.allclose(result.probabilities.sum(-1), torch.ones(len(SENTENCES)), atol=1e-5)
    # Full depth through the fused plain graph and through the layer graphs agree in int8 too.
    one_by_one = exported.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)[-1]
    plain = exported.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    torch.testing.assert_close(plain, one_by_one, atol=1e-4, rtol=0)
    assert exported.manifest.quantization == {
        "ops": "ffn",
        "per_channel": True,
        "method": Quantization("ffn", True).describe(),
        "selection": INT8_SELECTION,
    }
    # Attention stays fp32 by default; `all` quantizes it too. The cache serves only the default quantization.
    assert "QAttention" not in layer_ops and "Attention" in layer_ops
    assert_exit_graph_leaves_as_the_steps(exported, tokenizer)  # the exit graph nests the quantized steps
    every = export(model, tmp_path / "all", "int8", quantization=Quantization(ops="all", per_channel=False), threads=1)
    every_ops = {node.op_type for node in onnx.load(str(every.directory / layer_file(2))).graph.node}
    assert "QAttention" in every_ops
    with pytest.raises(ExportError, match="quantized as"):
        check_export(every.directory, model_digest(model), "int8")


def test_auto_picks_onnxruntime_on_the_cpu_and_torch_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_backend("auto", cpu, torch.float32) == "onnxruntime"
    assert pick_backend("auto", cpu, torch.bfloat16) == "torch"
    assert pick_backend("auto", cuda, torch.float16) == "torch"
    with pytest.raises(BackendError, match="runs on the CPU"):
        pick_backend("onnxruntime", cuda, torch.float32)
    with pytest.raises(BackendError, match="fp32"):
        pick_backend("onnxruntime", cpu, torch.bfloat16)
    with pytest.raises(BackendError, match="unknown backend"):
        pick_backend("tensorrt", cpu, torch.float32)


def test_auto_falls_back_to_torch_without_onnxruntime(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with caplog.at_level(logging.INFO, logger="deebert.backends"):
        assert pick_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert "onnxruntime is not installed" in caplog.text
    with pytest.raises(BackendError, match="pip install onnxruntime"):
        pick_backend("onnxruntime", torch.device("cpu"), torch.float32)


def test_runtime_presets_are_served_by_their_runtime(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from model.config import DeeBertConfig, Preset

    config = DeeBertConfig.load(tiny_checkpoint)
    config.with_presets([Preset("balanced", 0.123)], runtime="onnxruntime-int8").save(tiny_checkpoint)
    model = load_model(tiny_checkpoint)
    assert model.config.preset("balanced").threshold == 0.2  # fp32 presets for torch and fp32
    int8 = load_backend(model, "onnxruntime", "int8", tmp_path, threads=1)
    assert int8.config.preset("balanced").threshold == 0.123
    fp32 = load_backend(model, "onnxruntime", "fp32", tmp_path, threads=1)
    assert fp32.config.preset("balanced").threshold == 0.2
    with pytest.raises(BackendError, match="precision int8 is for the onnxruntime and openvino backends"):
        load_backend(model, "torch", "int8")


def encode_ids(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    from model.onnx_export import parity_batch

    return parity_batch(model, batch_size=3, length=9, seed=1)


def test_a_dynamic_int8_cache_from_an_older_selection_rule_is_exported_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Caches written before the feed-forward pair was found by module name (where graphs without a Gelu node had
    every product quantized) carry no selection record: they are rebuilt, with a warning saying why."""
    model = tiny_model("bert")
    directory = load_onnx_model(model, "int8", tmp_path, threads=1).directory
    manifest = Manifest.read(directory)
    assert manifest.quantization is not None
    del manifest.quantization["selection"]
    manifest.write(directory)
    with pytest.raises(ExportError, match="older rule"):
        check_export(directory, model_digest(model), "int8")
    with caplog.at_level(logging.WARNING, logger="deebert.onnx"):
        again = load_onnx_model(model, "int8", tmp_path, threads=1)
    assert again.directory == directory and again.manifest.quantization["selection"] == INT8_SELECTION
    assert "older rule" in caplog.text


def test_the_structure_benchmark_flattens_the_exit_graph_into_the_same_answer(pair, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`benchmarks.exit_graph_structure` times the exit graph against a copy without its `If` nodes: at threshold
    0 (every level entered) that copy must compute the same logits at the last layer."""
    import onnx

    from benchmarks.exit_graph_structure import flatten_exit_graph, graph_feeds

    model, exported = pair
    flat = flatten_exit_graph(exported.directory, tmp_path / "flat")
    assert not [n for n in _every_node(onnx.load(str(flat), load_external_data=False).graph) if n.op_type == "If"]
    ids = encode(tokenizer, SENTENCES[:1]).input_ids
    nested, flattened = (
        graph.run(graph_feeds(exported, graph, ids, 0.0)) for graph in (exported.exit_graph, exported.load_graph(flat))
    )
    assert int(nested[1][0]) == int(flattened[1][0]) == model.num_layers
    np.testing.assert_allclose(flattened[0], nested[0], atol=1e-5)


def stream_copy_probe(directory: str, pools: str) -> None:
    """Run in a fresh process (ONNX Runtime's pool mode is the process's, set by its first session): with
    per-session pools, the stream copy answers as torch does, from two threads at once; on the global pool there is
    no copy and the pools cannot change any more."""
    import threading

    from model import onnx_backend

    session_pools = pools == "session"
    if session_pools:
        assert onnx_backend.use_session_pools() is True
    else:
        onnx_backend.session_options(1)  # the first session's options: the global pool
    tokenizer = write_vocab(Path(directory) / "tokenizer")
    model = tiny_model("bert", pooling="mean")
    exported = export(model, Path(directory) / "fp32", "fp32", threads=2)
    copy = exported.stream_copy(1)
    if not session_pools:
        assert copy is None
        assert onnx_backend.use_session_pools() is False
        print("no copy")
        return
    assert isinstance(copy, OnnxDeeBert) and copy.layers[0] is not exported.layers[0]
    assert copy.plain is None and copy.exit_graph is None, "the layer graphs only"
    assert_matches_torch(model, copy, tokenizer)  # full depth (threshold 0) too, on the layers in turn
    assert_alone_equals_batched(model, copy, tokenizer)  # a lone row on the steps
    errors: list[BaseException] = []

    def answer_as_torch() -> None:
        try:
            for _ in range(5):
                assert_matches_torch(model, copy, tokenizer)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    streams = [threading.Thread(target=answer_as_torch) for _ in range(2)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join()
    assert not errors, errors
    print("copy answers as torch")


@pytest.mark.parametrize("session_pools", [True, False])
def test_a_stream_copy_needs_per_session_pools_and_answers_as_torch_from_two_threads(
    session_pools: bool, tmp_path: Path
) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    probe = "import sys; from tests.test_onnx_backend import stream_copy_probe as p; p(*sys.argv[1:])"
    command = [sys.executable, "-c", probe, str(tmp_path), "session" if session_pools else "global"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == ("copy answers as torch" if session_pools else "no copy")
