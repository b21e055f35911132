"""A batch of texts of unlike lengths runs as several calls over texts of like length: each text's answer is the
one the whole batch gives it, reported under its place in the batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.backends import ExitModel
from model.tokenization import DEFAULT_SPLIT_TOKENS, Encoded
from server.engine import Engine, RowOutcome
from tests.server_helpers import tiny_engine, write_word_vocab

SHORT = ["good", "dull cat", "i love this", "the movie"]
LONG = ["i love this cat and the movie was very dull " * 3, "the movie was good but the plot was dull " * 3]


def answers(engine: Engine, texts: list[str], thresholds: list[float]) -> tuple[dict[int, RowOutcome], list[int]]:
    """Each row's outcome by its place in the batch, and the sizes of the model's calls."""
    outcomes: dict[int, RowOutcome] = {}
    calls: list[int] = []
    run_call = engine._run_call

    def counting(
        model: ExitModel, items: list[Encoded], thresholds: list[float], on_exit: Callable[[int, RowOutcome], None]
    ) -> None:
        calls.append(len(items))
        run_call(model, items, thresholds, on_exit)

    def record(row: int, outcome: RowOutcome) -> None:
        assert row not in outcomes, "each row is answered once"
        outcomes[row] = outcome

    engine._run_call = counting  # type: ignore[method-assign]
    try:
        engine.run_batch(engine.tokenize(texts, None, True), thresholds, record)
    finally:
        del engine._run_call
    return outcomes, calls


@pytest.mark.parametrize("seed", [0, 1])
def test_a_split_batch_answers_every_row_as_the_whole_batch_does(tmp_path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    engine = tiny_engine(write_word_vocab(tmp_path))
    texts = [LONG[0], SHORT[0], SHORT[1], LONG[1], SHORT[2], SHORT[3]]  # interleaved, as requests arrive
    thresholds = [0.0, 0.3, 1e9, 0.3, 0.0, 0.7]  # full depth, presets, the first layer: rows leave at many layers
    engine.split_tokens = 0
    whole, whole_calls = answers(engine, texts, thresholds)
    engine.split_tokens = 10  # less than the long texts' padding, more than the short ones'
    split, split_calls = answers(engine, texts, thresholds)
    assert whole_calls == [6] and split_calls == [4, 2], "the short texts in one call, the long ones in another"
    assert sorted(split) == sorted(whole) == list(range(6))
    for row in range(6):
        assert split[row].exit_layer == whole[row].exit_layer and split[row].label_id == whole[row].label_id
        assert split[row].probabilities == pytest.approx(whole[row].probabilities, abs=1e-5)
    assert whole[2].exit_layer == 1 and whole[0].exit_layer == engine.num_layers


def test_packed_layers_take_batches_whole_by_default(tmp_path: Path) -> None:
    """ONNX Runtime fp32's layers skip the padding themselves (`pack_tokens`): splitting would only add calls."""
    pytest.importorskip("onnxruntime")
    from model.backends import load_backend

    engine = tiny_engine(write_word_vocab(tmp_path))
    exported = load_backend(engine.model, "onnxruntime", "fp32", tmp_path / "cache", 1)
    assert exported.packs_tokens
    packed = Engine(exported, engine.tokenizer, device=torch.device("cpu"))
    assert packed.split_tokens == 0
    assert Engine(exported, engine.tokenizer, device=torch.device("cpu"), split_tokens=100).split_tokens == 100


def test_batches_split_by_default_on_the_cpu_only(tmp_path: Path) -> None:
    engine = tiny_engine(write_word_vocab(tmp_path))
    assert engine.device.type == "cpu" and engine.split_tokens == DEFAULT_SPLIT_TOKENS > 0
    _, calls = answers(engine, SHORT * 8, [0.3] * 32)
    assert calls == [32], "like lengths: one call"
