"""The early-exit loop: exit rule, per-row thresholds, compaction, batch independence."""

from __future__ import annotations

import pytest
import torch

from model import exit_rule
from model.modeling import DeeBert
from tests.helpers import SENTENCES, all_entropies, encode, tiny_model


def test_threshold_zero_runs_every_row_to_the_last_layer(any_model: DeeBert, tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = encode(tokenizer)
    result = any_model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0] * len(SENTENCES))
    assert result.exit_layer == [any_model.num_layers] * len(SENTENCES)
    assert result.rows_per_layer == [len(SENTENCES)] * any_model.num_layers
    with torch.inference_mode():
        plain = torch.softmax(any_model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids), -1)
    torch.testing.assert_close(result.probabilities, plain, atol=1e-5, rtol=1e-4)
    assert result.label == plain.argmax(-1).tolist()


def test_huge_threshold_exits_every_row_at_layer_one(any_model: DeeBert, tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = encode(tokenizer)
    result = any_model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [1e9] * len(SENTENCES))
    assert result.exit_layer == [1] * len(SENTENCES)
    assert result.rows_per_layer == [len(SENTENCES)]
    entropies = all_entropies(any_model, batch)
    torch.testing.assert_close(torch.tensor(result.entropy), entropies[0], atol=1e-5, rtol=1e-4)


def test_mixed_per_row_thresholds_hit_their_target_layers(any_model: DeeBert, tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = encode(tokenizer)
    entropies = all_entropies(any_model, batch)  # [layers, rows]
    n = any_model.num_layers
    # Row r targets layer (r % n) + 1: a threshold just above its entropy there and above no earlier one
    # when possible; the expected layer comes from the vectorised exit rule on the same entropies.
    thresholds = []
    for row in range(len(SENTENCES)):
        target = row % n
        thresholds.append(0.0 if target == n - 1 else float(entropies[target, row]) + 1e-6)
    probabilities = torch.empty(*entropies.shape, 2)
    rule = exit_rule.get_criterion("entropy")
    expected = rule.first_exit_layers(probabilities, entropies, torch.tensor(thresholds)) + 1
    result = any_model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
    assert result.exit_layer == expected.tolist()
    assert len(set(result.exit_layer)) > 1, "the test should exercise several exit layers"
    for row, layer in enumerate(result.exit_layer):
        assert result.entropy[row] == pytest.approx(float(entropies[layer - 1, row]), abs=1e-5)
        if layer < n:
            assert result.entropy[row] < thresholds[row]


def test_compaction_runs_only_the_rows_still_going(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    batch = encode(tokenizer)
    thresholds = [1e9, 1e9, 0.0, 0.0, 1e9, 0.0]  # three rows leave at layer 1, three run to the end
    seen_rows: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, args: seen_rows.append(args[0].shape[0])) for layer in model.layers
    ]
    try:
        result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
    finally:
        for handle in handles:
            handle.remove()
    assert seen_rows == [6, 3, 3, 3]
    assert result.rows_per_layer == [6, 3, 3, 3]
    assert result.layers_executed == 15
    assert result.exit_layer == [1, 1, 4, 4, 1, 4]


def test_without_compaction_rows_stay_until_the_batch_is_done(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    batch = encode(tokenizer)
    thresholds = [1e9, 1e9, 0.0, 0.0, 1e9, 0.0]
    compacted = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
    masked = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, compact=False)
    assert masked.rows_per_layer == [6, 6, 6, 6]
    assert masked.exit_layer == compacted.exit_layer
    assert masked.label == compacted.label
    torch.testing.assert_close(masked.probabilities, compacted.probabilities, atol=1e-5, rtol=1e-4)


def test_compaction_trims_padding_no_remaining_row_needs(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    batch = encode(tokenizer, ["the movie was good", SENTENCES[3]])
    seen_lengths: list[int] = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen_lengths.append(args[0].shape[1]))
    model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0, 1e9])  # long row leaves at 1
    short = int(batch.attention_mask[0].sum())
    assert seen_lengths[0] == batch.input_ids.shape[1]
    assert seen_lengths[1:] == [short] * (model.num_layers - 1)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_a_row_answers_the_same_alone_or_in_any_batch(pooling: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("roberta", pooling=pooling)
    batch = encode(tokenizer)
    entropies = all_entropies(model, batch)
    thresholds = [float(entropies[1, r]) + 1e-4 if r % 2 else 0.0 for r in range(len(SENTENCES))]
    together = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
    for row, text in enumerate(SENTENCES):
        alone_batch = encode(tokenizer, [text])
        alone = model.infer(
            alone_batch.input_ids, alone_batch.attention_mask, alone_batch.token_type_ids, [thresholds[row]]
        )
        assert alone.exit_layer[0] == together.exit_layer[row]
        assert alone.label[0] == together.label[row]
        torch.testing.assert_close(alone.probabilities[0], together.probabilities[row], atol=1e-4, rtol=0)
    reversed_order = list(reversed(range(len(SENTENCES))))
    shuffled = encode(tokenizer, [SENTENCES[i] for i in reversed_order])
    again = model.infer(
        shuffled.input_ids, shuffled.attention_mask, shuffled.token_type_ids, [thresholds[i] for i in reversed_order]
    )
    assert [again.exit_layer[reversed_order.index(r)] for r in range(len(SENTENCES))] == together.exit_layer


@pytest.mark.parametrize("name", ["entropy", "max-prob", "patience"])
def test_a_batch_of_one_takes_the_one_row_path_and_answers_as_a_batch_does(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", pooling="mean")
    rule = exit_rule.get_criterion(name)
    batch = encode(tokenizer)
    for threshold in rule.default_grid(2, model.num_layers):
        together = model.infer(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * len(SENTENCES), criterion=rule
        )
        for row, text in enumerate(SENTENCES):
            one = encode(tokenizer, [text])
            alone = model.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold], criterion=rule)
            assert (alone.exit_layer[0], alone.label[0]) == (together.exit_layer[row], together.label[row])
            assert alone.entropy[0] == pytest.approx(together.entropy[row], abs=1e-5)
            torch.testing.assert_close(alone.probabilities[0], together.probabilities[row], atol=1e-4, rtol=0)
            assert alone.rows_per_layer == [1] * alone.exit_layer[0]
            # iter_exits (the engine's path) gives the same single exit.
            events = list(
                model.iter_exits(one.input_ids, one.attention_mask, one.token_type_ids, [threshold], criterion=rule)
            )
            assert [(e.layer, e.rows, e.labels, e.rows_run) for e in events] == [
                (alone.exit_layer[0], [0], alone.label, 1)
            ]


def test_a_batch_of_one_needs_exactly_one_threshold(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    one = encode(tokenizer, ["dull"])
    for thresholds in ([0.1, 0.2], [], torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="needs 1 threshold"):
            model.infer(one.input_ids, one.attention_mask, one.token_type_ids, thresholds)
    answer = model.infer(one.input_ids, one.attention_mask, one.token_type_ids, torch.tensor([[0.0]]))
    assert answer.exit_layer == [model.num_layers]


def test_iter_exits_yields_rows_as_they_leave(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    batch = encode(tokenizer)
    events = list(model.iter_exits(batch.input_ids, batch.attention_mask, batch.token_type_ids, [1e9, 0, 0, 0, 0, 1e9]))
    assert [e.layer for e in events] == [1, model.num_layers]
    assert events[0].rows == [0, 5] and events[1].rows == [1, 2, 3, 4]
    assert events[0].rows_run == 6 and events[1].rows_run == 4
    assert events[1].probabilities.shape == (4, 2)


def test_training_forward_returns_every_off_ramp(any_model: DeeBert, tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = encode(tokenizer)
    logits = any_model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    assert logits.shape == (any_model.num_layers, len(SENTENCES), 2)
    final_only = any_model(batch.input_ids, batch.attention_mask, batch.token_type_ids, only_final=True)
    torch.testing.assert_close(final_only[0], logits[-1])


def test_three_labels_work(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert", labels=("a", "b", "c"))
    batch = encode(tokenizer)
    result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.5] * len(SENTENCES))
    assert result.probabilities.shape == (len(SENTENCES), 3)
    torch.testing.assert_close(result.probabilities.sum(-1), torch.ones(len(SENTENCES)))
    assert all(0 <= e <= torch.log(torch.tensor(3.0)) + 1e-5 for e in result.entropy)


def test_mean_pooling_ignores_padding() -> None:
    model = tiny_model("bert", pooling="mean")
    hidden = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = model.off_ramps[0].pool(hidden, model.pool_weights(mask, hidden.dtype))
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


def test_off_ramps_are_skipped_once_only_full_depth_rows_remain(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    batch = encode(tokenizer, SENTENCES[:3])
    calls = [0] * model.num_layers
    for index, ramp in enumerate(model.off_ramps):
        # The exit loop calls each off-ramp's `classify` on its pooled features: count those calls.
        def counted(pooled, index=index, classify=ramp.classify):  # type: ignore[no-untyped-def]
            calls[index] += 1
            return classify(pooled)

        ramp.classify = counted
    result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [1e9, 0.0, 0.0])
    assert result.exit_layer == [1, model.num_layers, model.num_layers]
    # Layer 1's off-ramp decides row 0; after it leaves only threshold-0 rows remain, which no
    # intermediate off-ramp can release, so only the final classifier runs again.
    assert calls == [1, 0, 0, 1]
    plain = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0, 0.0, 0.0])
    assert plain.label[1:] == result.label[1:]
    torch.testing.assert_close(plain.probabilities[1:], result.probabilities[1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "thresholds"),
    [
        ("max-prob", [1.0, 0.99, 0.995, 0.9, 0.0, 0.999]),  # layer 1 is the most confident here
        ("patience", [0.0, 1.0, 2.0, 3.0, 2.0, 4.0]),  # every layer says label 0 here
        ("entropy", [0.0, 0.05, 0.04, 0.2, 1e9, 0.0]),
    ],
)
def test_every_criterion_serves_what_the_sweep_predicts(name: str, thresholds: list[float], tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The layer-by-layer loop (compacting, per-row thresholds) and the vectorised rule agree, row by row."""
    model = tiny_model("bert", sharpen=8.0)  # top-class probabilities 0.92-0.99 per layer
    rule = exit_rule.get_criterion(name)
    batch = encode(tokenizer)
    with torch.inference_mode():
        logits = model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    probabilities, entropies = exit_rule.entropy_from_logits(logits)
    expected = rule.first_exit_layers(probabilities, entropies, torch.tensor(thresholds)) + 1
    for compact in (True, False):
        result = model.infer(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, compact, criterion=rule
        )
        assert result.exit_layer == expected.tolist()
        assert len(set(result.exit_layer)) > 1, "the case should exercise early and full-depth exits"
        final = probabilities[expected - 1, torch.arange(len(SENTENCES))]
        torch.testing.assert_close(result.probabilities, final, atol=1e-4, rtol=0)
    # One row alone answers as in the batch (patience carries per-row state through compaction).
    for row, text in enumerate(SENTENCES):
        alone = encode(tokenizer, [text])
        single = model.infer(
            alone.input_ids, alone.attention_mask, alone.token_type_ids, [thresholds[row]], criterion=rule
        )
        assert single.exit_layer[0] == int(expected[row])


def test_the_checkpoint_criterion_is_the_default(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert")
    model.config = model.config.with_presets([], exit_criterion="patience")
    batch = encode(tokenizer)
    result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [1.0] * len(SENTENCES))
    assert result.exit_layer == [1] * len(SENTENCES)  # patience 1: the first layer always agrees with itself


def test_inference_reads_the_weights_by_column_and_follows_weight_changes() -> None:
    from model.modeling import OffRamp

    torch.manual_seed(0)
    ramp = OffRamp(hidden_size=16, num_labels=3, dropout=0.1, pooling="first").eval()
    pooled = torch.randn(5, 16)
    with torch.no_grad():
        reference = ramp.classifier(torch.tanh(ramp.dense(pooled)))
    with torch.inference_mode():
        fast = ramp.classify(pooled)
    assert torch.allclose(fast, reference, atol=1e-6)
    cached = ramp._inference
    assert cached is not None and cached.dense.is_contiguous() and cached.dense.shape == (16, 16)
    assert cached.classifier.is_contiguous() and cached.classifier.shape == (16, 3)
    # Training moves the weight in place (an optimizer step): the next inference pass sees the new weight. A
    # fused step bumps no version counter (what stage 2 and `deebert convert` use): the cache is dropped when
    # training starts and ends.
    before = reference
    for optimizer in (
        torch.optim.SGD(ramp.parameters(), lr=0.5),
        torch.optim.AdamW(ramp.parameters(), lr=0.5, fused=True),
    ):
        ramp.train()
        ramp.classify(pooled).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ramp.eval()
        with torch.no_grad():
            moved = ramp.classifier(torch.tanh(ramp.dense(pooled)))
            assert not torch.allclose(moved, before)
            assert torch.allclose(ramp.classify(pooled), moved, atol=1e-6)
        before = moved
    # So does loading other weights, and a change of dtype.
    other = OffRamp(hidden_size=16, num_labels=3, dropout=0.1, pooling="first").eval()
    ramp.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(ramp.classify(pooled), other.classify(pooled), atol=1e-6)
        assert ramp.double().classify(pooled.double()).dtype == torch.float64
    # The laid-out copies are never saved.
    assert set(ramp.state_dict()) == {"dense.weight", "dense.bias", "classifier.weight", "classifier.bias"}
