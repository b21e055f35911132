"""Expected saving, oracle, sweep and calibration on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from model import exit_rule
from model.calibrate import calibrate
from model.evaluate import _snap, fit_exit_costs, oracle, per_layer_accuracy, simulate
from model.saving import expected_saving, saving_from_counts, time_weighted_saving


def test_expected_saving_matches_the_paper_formula() -> None:
    # 3 layers: 2 samples leave at 1, 1 at 2, 1 at 3 → 1 - (1·2 + 2·1 + 3·1) / (3·4) = 1 - 7/12
    assert saving_from_counts([2, 1, 1]) == pytest.approx(5 / 12)
    assert saving_from_counts([0, 0, 5]) == 0.0
    assert saving_from_counts([4, 0, 0]) == pytest.approx(2 / 3)
    assert saving_from_counts([0, 0, 0]) is None


def test_the_time_weighted_saving_weighs_each_sample_by_its_full_depth_time() -> None:
    layers = [1, 1, 3, 3]
    # Equal times: the paper's count.
    assert time_weighted_saving(layers, [2.0] * 4, 3) == pytest.approx(expected_saving(layers, 3))
    # The samples that go deep take three times as long: 1 − (1·1 + 1·1 + 3·3 + 3·3) / (3 · 8) = 1 − 20/24.
    assert time_weighted_saving(layers, [1.0, 1.0, 3.0, 3.0], 3) == pytest.approx(4 / 24)
    assert time_weighted_saving([], [], 3) is None
    with pytest.raises(ValueError, match="outside"):
        time_weighted_saving([4], [1.0], 3)
    with pytest.raises(ValueError, match="times"):
        time_weighted_saving([1, 2], [1.0], 3)


def test_entropy_is_stable_and_in_nats() -> None:
    probabilities, entropy = exit_rule.entropy_from_logits(torch.tensor([[0.0, 0.0], [1000.0, -1000.0], [0.0, 0.0]]))
    assert entropy[0] == pytest.approx(math.log(2))
    assert entropy[1] == pytest.approx(0.0, abs=1e-12)
    assert not torch.isnan(entropy).any()
    torch.testing.assert_close(probabilities[0], torch.tensor([0.5, 0.5]))


ENTROPY = exit_rule.get_criterion("entropy")


def test_exit_rule_is_strictly_below_the_threshold() -> None:
    entropy = torch.tensor([0.1, 0.2, 0.0])
    leaving, _ = ENTROPY.step(torch.empty(3, 2), entropy, torch.tensor([0.2, 0.2, 0.0]), None)
    assert leaving.tolist() == [True, False, False]


def test_first_exit_layers_for_rows_and_sweeps() -> None:
    entropies = torch.tensor([[0.5, 0.1], [0.2, 0.6], [0.4, 0.4]])  # [layers=3, samples=2]
    probabilities = torch.full((3, 2, 2), 0.5)
    assert ENTROPY.first_exit_layers(probabilities, entropies, torch.tensor([0.3, 0.3])).tolist() == [1, 0]
    assert ENTROPY.first_exit_layers(probabilities, entropies, torch.tensor([0.0, 0.0])).tolist() == [2, 2]
    sweep = ENTROPY.first_exit_layers(probabilities, entropies, torch.tensor([[0.0], [0.3], [1.0]]))
    assert sweep.tolist() == [[2, 2], [1, 0], [0, 0]]


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.3", True])
def test_invalid_thresholds_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        ENTROPY.validate(value)


def _layers(*rows_per_layer: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [layers, samples, labels] from hand-made logits, and their entropies."""
    probabilities, entropies = exit_rule.entropy_from_logits(torch.tensor(rows_per_layer))
    return probabilities, entropies


# Four layers, three samples, two labels; each sample's logits by layer, written by hand:
#   sample 0: confident label 0 from layer 1 on
#   sample 1: label flips 1, 0, 0, 0 — unsure at first, then settles
#   sample 2: flips every layer (1, 0, 1, 0) and never gets confident
HAND_MADE = _layers(
    [[4.0, -4.0], [0.2, 0.6], [0.1, 0.3]],
    [[4.0, -4.0], [0.5, 0.0], [0.3, 0.1]],
    [[4.0, -4.0], [3.0, -3.0], [0.1, 0.3]],
    [[4.0, -4.0], [3.0, -3.0], [0.3, 0.1]],
)


@pytest.mark.parametrize(
    ("name", "threshold", "expected_layers"),
    [
        ("entropy", 0.0, [4, 4, 4]),  # full depth
        ("entropy", 0.1, [1, 3, 4]),  # H(±4) ≈ 0.003, H(±3) ≈ 0.015, the rest > 0.6
        ("entropy", 10.0, [1, 1, 1]),
        ("max-prob", 1.0, [4, 4, 4]),  # full depth
        ("max-prob", 0.99, [1, 3, 4]),  # softmax(±4) ≈ 0.9997, softmax(±3) ≈ 0.9975, the rest < 0.65
        ("max-prob", 0.6, [1, 2, 4]),  # softmax(0.5, 0) ≈ 0.62 at layer 2
        ("max-prob", 0.0, [1, 1, 1]),
        ("patience", 0.0, [4, 4, 4]),  # full depth
        ("patience", 1.0, [1, 1, 1]),  # one layer agrees with itself
        ("patience", 2.0, [2, 3, 4]),  # sample 1: labels 1, 0, 0 → two in a row at layer 3
        ("patience", 3.0, [3, 4, 4]),
        ("patience", 9.0, [4, 4, 4]),
    ],
)
def test_criteria_on_hand_made_logit_sequences(name: str, threshold: float, expected_layers: list[int]) -> None:
    probabilities, entropies = HAND_MADE
    rule = exit_rule.get_criterion(name)
    per_row = rule.first_exit_layers(probabilities, entropies, torch.tensor([threshold] * 3)) + 1
    assert per_row.tolist() == expected_layers
    # A sweep row gives the same as per-row thresholds.
    sweep = rule.first_exit_layers(probabilities, entropies, torch.tensor([[rule.full_depth], [threshold]])) + 1
    assert sweep.tolist() == [[4, 4, 4], expected_layers]


@pytest.mark.parametrize(
    ("name", "bad"),
    [("max-prob", 1.5), ("max-prob", -0.1), ("patience", 1.5), ("patience", -1.0), ("entropy", -1.0)],
)
def test_each_criterion_refuses_thresholds_outside_its_range(name: str, bad: float) -> None:
    with pytest.raises(ValueError):
        exit_rule.get_criterion(name).validate(bad)


def test_patience_of_at_least_the_depth_skips_every_off_ramp() -> None:
    patience = exit_rule.get_criterion("patience")
    assert not patience.can_exit_early(torch.tensor([4.0, 9.0, 0.0]), 4)  # k layers agree at layer k at the earliest
    assert patience.can_exit_early(torch.tensor([4.0, 3.0]), 4)


def test_unknown_criterion_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="entropy, max-prob, patience"):
        exit_rule.get_criterion("vibes")


@pytest.mark.parametrize("name", ["entropy", "max-prob", "patience"])
def test_full_depth_threshold_never_exits_early_and_can_be_skipped(name: str) -> None:
    rule = exit_rule.get_criterion(name)
    assert not rule.can_exit_early(torch.tensor([rule.full_depth, rule.full_depth]), 4)
    assert rule.can_exit_early(torch.tensor([rule.full_depth, rule.exits_at_first_layer(2)]), 4)
    probabilities, entropies = HAND_MADE
    first = rule.first_exit_layers(probabilities, entropies, torch.tensor([rule.exits_at_first_layer(2)] * 3))
    assert first.tolist() == [0, 0, 0]


def test_one_rows_entropy_in_python_numbers_is_the_tensor_ones() -> None:
    logits = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 6
    logits[0] = torch.tensor([1000.0, -1000.0, 0.0])  # stable where a plain softmax overflows
    probabilities, entropies = exit_rule.entropy_from_logits(logits)
    for row, values in enumerate(logits.tolist()):
        row_probabilities, row_entropy = exit_rule.entropy_of(values)
        assert row_probabilities == pytest.approx(probabilities[row].tolist(), abs=1e-6)
        assert row_entropy == pytest.approx(float(entropies[row]), abs=1e-6)
        assert exit_rule.argmax(row_probabilities) == int(probabilities[row].argmax())
    assert exit_rule.argmax([0.5, 0.5]) == 0 == int(torch.tensor([0.5, 0.5]).argmax())


@pytest.mark.parametrize("name", ["entropy", "max-prob", "patience"])
def test_the_one_row_decision_is_the_step_function(name: str) -> None:
    """`leaves` / `never_exits_early_at` (the batch-1 path) decide what `step` / `never_exits_early` decide, over
    random off-ramp outputs and thresholds, for each criterion's override and the base class's default."""
    rule = exit_rule.get_criterion(name)
    generator = torch.Generator().manual_seed(1)
    layers, rows = 6, 300
    probabilities, entropies = exit_rule.entropy_from_logits(torch.randn(layers, rows, 2, generator=generator) * 3)
    grid = rule.default_grid(2, layers)
    thresholds = torch.tensor([grid[i % len(grid)] for i in range(rows)], dtype=torch.float32)
    for value in [*grid, 0.0, 1.0, float(layers), 7.0]:
        expected = bool(rule.never_exits_early(torch.tensor([value]), layers)[0])
        assert rule.never_exits_early_at(value, layers) == expected
        assert exit_rule.ExitCriterion.never_exits_early_at(rule, value, layers) == expected
    state: exit_rule.State = None
    row_states: list[object] = [None] * rows
    default_states: list[object] = [None] * rows
    for layer in range(layers):
        leaving, state = rule.step(probabilities[layer], entropies[layer], thresholds, state)
        for row in range(rows):
            args = (probabilities[layer, row].tolist(), float(entropies[layer, row]), float(thresholds[row]))
            decided, row_states[row] = rule.leaves(*args, row_states[row])
            by_default, default_states[row] = exit_rule.ExitCriterion.leaves(rule, *args, default_states[row])
            assert decided == by_default == bool(leaving[row]), (layer, row)


def _hand_made() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    # 3 layers, 4 samples, 2 labels. Predictions per layer and confidence are chosen by hand.
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]],  # layer 1: right, wrong, right, wrong
            [[0.8, 0.2], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]],  # layer 2: right, right, right, wrong
            [[0.95, 0.05], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]],  # layer 3: right, right, right, wrong
        ]
    )
    entropies = -(probs * probs.log()).sum(-1)
    return probs, entropies, [0, 1, 1, 1]


def test_oracle_on_a_hand_made_case() -> None:
    probs, _, labels = _hand_made()
    result = oracle(probs, labels)
    # exits: sample 0 at 1, sample 1 at 2, sample 2 at 1, sample 3 never right → 3
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["expected_saving"] == pytest.approx(1 - (1 + 2 + 1 + 3) / 12)


def test_exit_costs_are_fitted_from_the_sweep_timings() -> None:
    # A 10 ms plain forward of which 4 % is outside the layers; each extra off-ramp costs 0.1 ms.
    expected = [0.0, 0.2, 0.5, 0.8]
    extra = [0.0, 4.0, 2.5, 0.0]
    exit_ms = [10.0 * (1 - e) + 0.1 * r + 0.04 * 10.0 * e for e, r in zip(expected, extra, strict=True)]
    off_ramp_ms, unsaved = fit_exit_costs(10.0, exit_ms, expected, extra) or (0.0, 0.0)
    assert off_ramp_ms == pytest.approx(0.1) and unsaved == pytest.approx(0.04)
    # measured / expected = 1 - unsaved - off_ramp_ms * extra / (plain_ms * expected), as the report says
    measured = 1 - exit_ms[1] / 10.0
    assert measured / expected[1] == pytest.approx(1 - 0.04 - 0.1 * 4.0 / (10.0 * 0.2))
    assert fit_exit_costs(10.0, [10.0, 9.0], [0.0, 0.1], [0.0, 0.0]) is None  # nothing to tell them apart


def test_a_threshold_equal_to_a_preset_but_for_rounding_is_the_presets() -> None:
    presets = [0.05146353133022785, 0.222]
    assert _snap(0.05146350897848606, presets) == presets[0]  # two calibrations, float rounding apart
    assert _snap(0.0515, presets) == 0.0515 and _snap(0.3, []) == 0.3


def test_sweep_and_per_layer_accuracy_on_a_hand_made_case() -> None:
    probs, entropies, labels = _hand_made()
    assert per_layer_accuracy(probs, labels) == pytest.approx([0.5, 0.75, 0.75])
    zero, huge = simulate(probs, entropies, labels, [0.0, 10.0])
    assert zero.exit_counts == [0, 0, 4] and zero.expected_saving == 0.0 and zero.accuracy == pytest.approx(0.75)
    assert huge.exit_counts == [4, 0, 0] and huge.expected_saving == pytest.approx(2 / 3)
    assert huge.accuracy == pytest.approx(0.5)


def test_calibration_picks_the_largest_threshold_within_each_tolerance() -> None:
    probs, entropies, labels = _hand_made()
    presets = {p.name: p for p in calibrate(probs, entropies, labels, {"lossless": 0.0, "fast": 0.3})}
    full = simulate(probs, entropies, labels, [0.0])[0].accuracy
    for preset in presets.values():
        point = simulate(probs, entropies, labels, [preset.threshold])[0]
        assert point.accuracy >= full - preset.max_accuracy_drop - 1e-12  # type: ignore[operator]
        assert preset.accuracy == pytest.approx(point.accuracy)
        # Every larger threshold that changes an exit breaks the tolerance.
        larger = [t for t in ENTROPY.candidates(probs, entropies) if t > preset.threshold]
        for point in simulate(probs, entropies, labels, larger):
            assert point.accuracy < full - preset.max_accuracy_drop  # type: ignore[operator]
    assert presets["fast"].threshold >= presets["lossless"].threshold
    assert presets["fast"].expected_saving > 0


def test_a_reduced_precision_runtime_is_held_to_the_fp32_models_accuracy() -> None:
    probs, entropies, labels = _hand_made()  # its own full depth: 0.75
    own = {p.name: p for p in calibrate(probs, entropies, labels, {"fast": 0.3})}
    # Held to a reference of 0.8 (the fp32 model's), only thresholds scoring >= 0.5 may serve "fast"...
    held = {p.name: p for p in calibrate(probs, entropies, labels, {"fast": 0.3}, reference_accuracy=0.8)}
    assert held["fast"].accuracy >= 0.5 - 1e-12 and held["fast"].threshold <= own["fast"].threshold
    # ...and where not even full depth meets the mark, the preset is full depth.
    strict = calibrate(probs, entropies, labels, {"lossless": 0.0}, reference_accuracy=0.9)[0]
    assert strict.threshold == 0.0 and strict.expected_saving == 0.0


@pytest.mark.parametrize("name", sorted(exit_rule.CRITERIA))
def test_batch1_outputs_equal_the_tensor_outputs(name: str) -> None:
    """Each criterion's probabilities and entropy from one row's logits as Python numbers (the batch-1 path)
    match its tensor version; for the multi-label rule they are the sigmoids and the largest binary entropy."""
    criterion = exit_rule.CRITERIA[name]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=generator) * 6
    probabilities, entropies = criterion.outputs(logits)
    for row in range(logits.shape[0]):
        one_probabilities, one_entropy = criterion.outputs_of(logits[row].tolist())
        assert one_probabilities == pytest.approx(probabilities[row].tolist(), abs=1e-6)
        assert one_entropy == pytest.approx(float(entropies[row]), abs=1e-5)
    if criterion.multi_label:
        assert torch.allclose(probabilities, torch.sigmoid(logits))
        assert float(entropies.max()) <= math.log(2) + 1e-6
        sure = criterion.outputs(torch.tensor([[20.0, -20.0, 20.0]]))[1]
        assert float(sure[0]) < 1e-6, "every label certain: the row may leave at any threshold > 0"


def test_the_graph_form_of_the_entropy_rule_decides_as_leaves() -> None:
    """`EntropyCriterion.graph_leaves` (what ONNX Runtime's exit graph decides with) run in a one-node-chain
    graph gives `leaves`' answer on random logits and thresholds (none within 1e-5 of an entropy)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from model.onnx_backend import session_options

    rule = exit_rule.EntropyCriterion()
    assert rule.in_graph and not exit_rule.get_criterion("label-entropy").in_graph
    assert not exit_rule.get_criterion("max-prob").in_graph and not exit_rule.get_criterion("patience").in_graph
    for labels in (2, 3, 5):
        nodes = rule.graph_leaves("logits", "negated", "leaves", "r/")
        graph = helper.make_graph(
            [helper.make_node("Neg", ["threshold"], ["negated"]), *nodes],
            "rule",
            [
                helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, labels]),
                helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
            ],
            [helper.make_tensor_value_info("leaves", TensorProto.BOOL, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        options = session_options(1)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        generator = torch.Generator().manual_seed(labels)
        decided = 0
        for _ in range(200):
            logits = torch.randn(1, labels, generator=generator) * 4
            threshold = float(torch.rand((), generator=generator)) * math.log(labels)
            probabilities, entropy = exit_rule.entropy_of(logits[0].tolist())
            if abs(entropy - threshold) < 1e-5:
                continue
            expected, _ = rule.leaves(probabilities, entropy, threshold, None)
            (got,) = session.run(None, {"logits": logits.numpy(), "threshold": torch.tensor(threshold).numpy()})
            assert bool(got.reshape(-1)[0]) == expected
            decided += int(expected)
        assert 20 < decided < 180  # both answers were tested
