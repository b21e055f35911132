"""Classifying many texts at once (`deebert classify`): sorted by length, batched, and run with every layer's
call refilled (`early_exit.iter_exits_refilled`; at full depth, batch by batch), the fastest way through the
exit loop when nobody waits for one answer.

Answers come back in input order, each with the layer it left at (1..n), its entropy and probabilities: the
same as the server gives for the text at the same threshold (its batch's padding aside, which moves floats in
their last digits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.early_exit import EarlyExitModel, RefillBatch
from model.saving import exit_counts, expected_saving
from model.tokenization import Encoded, groups_by_length, pad_batch


@dataclass
class BulkAnswer:
    """One text's answer."""

    label_id: int
    exit_layer: int
    entropy: float
    probabilities: list[float]


@dataclass
class BulkRun:
    """Every text's answer in input order, and what the run took."""

    answers: list[BulkAnswer]
    seconds: float
    num_layers: int

    @property
    def texts_per_s(self) -> float:
        return len(self.answers) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def exit_counts(self) -> list[int]:
        """How many texts left at each layer (1..n)."""
        return exit_counts((answer.exit_layer for answer in self.answers), self.num_layers)

    @property
    def expected_saving(self) -> float | None:
        """1 − Σ i·Nᵢ / (n·Σ Nᵢ) over these texts (the paper's expected saving); None for no texts."""
        return expected_saving((answer.exit_layer for answer in self.answers), self.num_layers)


def length_sorted_batches(
    encoded: Sequence[Encoded], threshold: float, pad_token_id: int, batch_size: int
) -> tuple[list[int], list[RefillBatch]]:
    """The texts' order by length (shortest first; ties in input order) and their batches in that order."""
    groups = groups_by_length(encoded, batch_size)
    batches: list[RefillBatch] = []
    for group in groups:
        batch = pad_batch([encoded[index] for index in group], pad_token_id)
        batches.append((batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * len(group)))
    return [index for group in groups for index in group], batches


def classify_all(
    model: EarlyExitModel,
    encoded: Sequence[Encoded],
    threshold: float,
    pad_token_id: int,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> BulkRun:
    """Every text's answer at `threshold`, computed in length-sorted batches of `batch_size` with calls refilled
    between layers (at most `batch_size` rows per call). `on_progress(count)` hears how many texts just got
    their answers."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order, batches = length_sorted_batches(encoded, threshold, pad_token_id, batch_size)
    answers: list[BulkAnswer | None] = [None] * len(encoded)
    started = clock()
    for exits in model.iter_exits_refilled(batches, batch_size):
        probabilities = exits.probabilities.float().cpu().tolist()
        for position, row in enumerate(exits.rows):
            answers[order[row]] = BulkAnswer(
                exits.labels[position], exits.layer, exits.entropies[position], probabilities[position]
            )
        if on_progress is not None:
            on_progress(len(exits.rows))
    seconds = clock() - started
    done = [answer for answer in answers if answer is not None]
    assert len(done) == len(encoded), "every text leaves once"
    return BulkRun(done, seconds, model.num_layers)
