"""Refilling calls between layers (`early_exit.iter_exits_refilled`): rows of later batches fill the places
that rows leaving free, with each row's answer as in its own batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from model import exit_rule
from model.backends import SplitExitModel
from model.early_exit import infer_refilled, iter_exits_refilled
from model.tokenization import pad_arrays, tokenize
from tests.helpers import assert_refilled_matches_per_batch, refill_batches, tiny_model

NUM_LAYERS = 3
SURE, UNSURE = [20.0, 0.0], [0.0, 0.0]  # entropy ~0 and ln 2


@dataclass
class _Rows:
    plan: torch.Tensor  # each row's planned exit layer


class PlannedSteps:
    """Exit steps whose rows leave at planned layers (their off-ramp sure there, unsure before), recording
    the rows of every call by layer."""

    num_layers = NUM_LAYERS
    borrows_outputs = False

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.joins: list[list[int]] = []

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> _Rows:
        return _Rows(input_ids[:, 0].clone())

    def run_layer(self, state: _Rows, layer_number: int) -> _Rows:
        self.calls.append((layer_number, int(state.plan.shape[0])))
        return state

    def off_ramp_logits(self, state: _Rows, layer_number: int) -> torch.Tensor:
        return torch.tensor([SURE if int(p) <= layer_number else UNSURE for p in state.plan])

    def keep_rows(self, state: _Rows, keep_index: torch.Tensor) -> _Rows:
        return _Rows(state.plan[keep_index])

    def join(self, parts: Sequence[tuple[_Rows, torch.Tensor]]) -> _Rows:
        self.joins.append([int(index.numel()) for _, index in parts])
        return _Rows(torch.cat([state.plan[index] for state, index in parts]))

    def full_depth_logits(self, *args: object) -> None:
        return None


def planned_batches(plans: list[list[int]]) -> list[tuple]:  # type: ignore[type-arg]
    """One batch per list of planned exit layers (the plan rides in the token ids)."""
    return [
        (torch.tensor([[p, 0] for p in plan]), torch.ones(len(plan), 2, dtype=torch.long), None, [0.1] * len(plan))
        for plan in plans
    ]


def test_rows_leaving_free_places_that_later_batches_fill() -> None:
    """Eight batches of four, half leaving at layer 1: alone each would run layers 2 and 3 on two rows (16
    calls of two); refilled, layers 2 and 3 run full calls of four (8 calls)."""
    steps = PlannedSteps()
    batches = planned_batches([[1, 3, 1, 3]] * 8)
    exits = list(iter_exits_refilled(steps, batches, exit_rule.get_criterion("entropy"), max_rows=4))
    assert [rows for layer, rows in steps.calls if layer == 1] == [4] * 8
    assert [rows for layer, rows in steps.calls if layer > 1] == [4] * 8
    assert sorted(row for e in exits for row in e.rows) == list(range(32))
    assert {row: e.layer for e in exits for row in e.rows} == {row: 1 if row % 2 == 0 else 3 for row in range(32)}


def test_the_deepest_full_layer_runs_first_and_the_rest_drains_deepest_first() -> None:
    steps = PlannedSteps()
    # Batch 1's rows all go on; batch 2's too: layer 2 then holds a full call and runs before batch 3 starts.
    batches = planned_batches([[3, 3], [2, 3], [1, 1], [3, 2]])
    result = infer_refilled(steps, batches, exit_rule.get_criterion("entropy"), num_labels=2, max_rows=4)
    assert steps.calls[:3] == [(1, 2), (1, 2), (2, 4)]
    assert result.exit_layer == [3, 3, 2, 3, 1, 1, 3, 2]
    assert sum(result.rows_per_layer) == sum(result.exit_layer)
    assert all(rows <= 4 for _, rows in steps.calls)


def test_a_layer_holding_more_than_a_call_runs_it_and_keeps_the_rest() -> None:
    steps = PlannedSteps()
    batches = planned_batches([[3, 3, 3], [3, 3, 3], [3, 3, 3]])
    result = infer_refilled(steps, batches, exit_rule.get_criterion("entropy"), num_labels=2, max_rows=4)
    assert result.exit_layer == [3] * 9
    assert max(rows for _, rows in steps.calls) == 4
    assert sum(rows for layer, rows in steps.calls if layer == 2) == 9


def test_when_no_row_can_leave_early_each_batch_takes_its_full_depth_path(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()
    batches = refill_batches(tokenizer, [0.0], 4)
    refilled = model.infer_refilled(batches, 4)
    per_batch = [model.infer(*batch) for batch in batches]
    assert refilled.exit_layer == [model.num_layers] * sum(len(r.exit_layer) for r in per_batch)
    assert refilled.label == [label for r in per_batch for label in r.label]
    assert refilled.rows_per_layer == [len(refilled.exit_layer)] * model.num_layers


def test_a_batch_larger_than_a_call_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()
    with pytest.raises(ValueError, match="1 to 2 rows"):
        model.infer_refilled(refill_batches(tokenizer, [0.3], 4), 2)
    with pytest.raises(ValueError, match="at least 1"):
        model.infer_refilled(refill_batches(tokenizer, [0.3], 4), 0)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_torch_rows_refilled_answer_as_in_their_own_batches(model_type: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(model_type, pooling="mean")
    assert_refilled_matches_per_batch(model, model, tokenizer)


def test_a_criterion_with_per_row_state_travels_with_its_rows(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Patience counts each row's streak of equal labels: joined and split calls carry it row by row."""
    model = tiny_model(pooling="mean")
    assert_refilled_matches_per_batch(model, model, tokenizer, exit_rule.get_criterion("patience"))


def test_a_split_refills_on_its_batched_runtime(tokenizer) -> None:  # type: ignore[no-untyped-def]
    single, batched = tiny_model(seed=1), tiny_model(seed=0)
    split = SplitExitModel(single, batched)
    batches = refill_batches(tokenizer, [0.3], 4)
    assert split.infer_refilled(batches, 4).label == batched.infer_refilled(batches, 4).label
    assert [e.rows for e in split.iter_exits_refilled(batches, 4)] == [
        e.rows for e in batched.iter_exits_refilled(batches, 4)
    ]


def test_a_split_answers_a_lone_row_on_its_single_runtime(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The server's lone-row entry goes to the runtime tuned for batches of one, as `infer` of one row does."""
    single, batched = tiny_model(seed=1), tiny_model(seed=0)
    split = SplitExitModel(single, batched)
    arrays = pad_arrays(tokenize(tokenizer, ["a dull and boring plot"], None, 48), tokenizer.pad_token_id)
    for threshold in (0.0, 0.3, 10.0):
        assert split.exit_lone_row(*arrays, threshold) == single.exit_lone_row(*arrays, threshold)
        answer = split.exit_lone_row(*arrays, threshold)
        assert answer.layer == split.infer(*(torch.from_numpy(a) for a in arrays), [threshold]).exit_layer[0]


class BorrowingSteps(PlannedSteps):
    """Planned steps whose layers answer in one buffer per layer that their next call overwrites, as OpenVINO's
    requests do (`borrows_outputs`)."""

    borrows_outputs = True

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[int, torch.Tensor] = {}

    def run_layer(self, state: _Rows, layer_number: int) -> _Rows:
        super().run_layer(state, layer_number)
        buffer = self.buffers.setdefault(layer_number, torch.zeros(64, dtype=torch.long))
        buffer.fill_(-1)  # what an overwritten buffer holds for rows that are not this call's
        buffer[: state.plan.shape[0]] = state.plan
        return _Rows(buffer[: state.plan.shape[0]])


def test_rows_waiting_across_calls_are_copied_out_of_a_borrowed_buffer() -> None:
    """Rows that wait at a layer while the layer before runs again (its buffer overwritten) keep their own
    states: every row leaves where it was planned to."""
    steps = BorrowingSteps()
    plans = [[1, 3, 2, 3], [3, 1, 1, 2], [2, 2, 3, 1], [3, 3, 3, 3], [1, 2, 3, 1]]
    result = infer_refilled(steps, planned_batches(plans), exit_rule.get_criterion("entropy"), 2, max_rows=4)
    assert result.exit_layer == [layer for plan in plans for layer in plan]
