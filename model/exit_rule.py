"""The exit rule: when a row leaves the encoder early. Every place that decides an exit goes through here.

DeeBERT's rule (the default) leaves at the first layer whose off-ramp entropy is below the threshold S.
Two later rules sit behind the same interface: `max-prob` (the top class probability reaches t) and
`patience` (PABEE: the same label k layers in a row). A criterion is a step function applied layer by layer:
the serving loop (`DeeBert.iter_exits`) calls `step` on the rows still running, and the vectorised
`first_exit_layers` used by evaluation sweeps and calibration calls the very same `step` over precomputed
off-ramp outputs, so the served behaviour and the reported numbers cannot drift apart. A batch of one row
decides with `leaves`, the same step on Python numbers (tested equal to `step`), because at batch 1 the
tensor operations' dispatch costs more than the arithmetic.

Each criterion has a full-depth threshold (entropy 0, max-prob 1, patience 0) that never exits early;
the last layer always exits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

# Per-row state a criterion carries from layer to layer ([..., rows] in the last dimension), or None.
State = torch.Tensor | None
# The same for one row as Python values (`ExitCriterion.leaves`), or None.
RowState = Any


def entropy_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and entropy (nats) of each row's softmax, stably from log_softmax in fp32."""
    log_probs = torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
    probabilities = log_probs.exp()
    entropy = (probabilities * log_probs).sum(dim=-1).neg_()
    return probabilities, entropy


def entropy_of(logits: Sequence[float]) -> tuple[list[float], float]:
    """One row's probabilities and entropy (nats) from its logits as Python numbers: the arithmetic of
    `entropy_from_logits` (a stable log-softmax, then −Σ p·log p) for the batch-1 path, where a handful of
    float operations costs a fraction of the tensor operations' dispatch."""
    top = max(logits)
    shifted = [value - top for value in logits]
    exps = [math.exp(value) for value in shifted]
    total = sum(exps)
    probabilities = [value / total for value in exps]
    # −Σ p·log p with log p = shifted − log(total), and Σ p = 1: one exp per label and one log in all.
    return probabilities, math.log(total) - sum(p * value for p, value in zip(probabilities, shifted, strict=True))


# A multi-label classifier's label is on when its sigmoid reaches this (transformers' own rule for such heads).
LABEL_ON_PROBABILITY = 0.5


def label_entropy_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label outputs: each label's sigmoid, and the largest of the labels' binary entropies (nats), in
    fp32. H(σ(x)) = σ(x)·softplus(−x) + σ(−x)·softplus(x), stable for any x."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    probabilities = torch.sigmoid(x)
    entropies = probabilities * F.softplus(-x) + (1 - probabilities) * F.softplus(x)
    return probabilities, entropies.amax(dim=-1)


def label_entropy_of(logits: Sequence[float]) -> tuple[list[float], float]:
    """`label_entropy_from_logits` for one row as Python numbers (the batch-1 path)."""
    probabilities, worst = [], 0.0
    for x in logits:
        p = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        softplus_neg = math.log1p(math.exp(-abs(x))) + max(-x, 0.0)
        softplus_pos = math.log1p(math.exp(-abs(x))) + max(x, 0.0)
        probabilities.append(p)
        worst = max(worst, p * softplus_neg + (1 - p) * softplus_pos)
    return probabilities, worst


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first one on ties (as `torch.argmax`)."""
    return max(range(len(values)), key=values.__getitem__)


def _finite_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"threshold must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"threshold must be finite, got {value}")
    return float(value)


def _midpoints(sorted_values: torch.Tensor) -> list[float]:
    """Midpoints between neighbouring distinct values: every threshold between them exits the same rows."""
    return ((sorted_values[1:] + sorted_values[:-1]) / 2).tolist()  # type: ignore[no-any-return]


class ExitCriterion(ABC):
    """One way of deciding, after each layer, which rows leave."""

    name: ClassVar[str]
    full_depth: ClassVar[float]  # the threshold that never exits before the last layer
    meaning: ClassVar[str]  # what the threshold is, for help texts and error messages
    # True for classifiers with one sigmoid per label (any number of labels on); False: one softmax.
    multi_label: ClassVar[bool] = False
    # Whether `graph_leaves` writes this rule as graph nodes (a runtime then decides a batch of one row's exits
    # inside one call: `model.onnx_export.write_exit_graph`).
    in_graph: ClassVar[bool] = False

    def graph_leaves(self, logits: str, negated_threshold: str, leaves: str, prefix: str) -> list[Any]:
        """ONNX nodes computing `leaves` (bool [1]) from one row's off-ramp `logits` ([1, labels] float) and
        the negated threshold (a float scalar input): the same decision as `leaves`, for a runtime's graph."""
        raise NotImplementedError(f"the {self.name} rule has no graph form")

    def outputs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An off-ramp's probabilities [..., labels] and the entropy [...] its exit decision reads."""
        return entropy_from_logits(logits)

    def outputs_of(self, logits: Sequence[float]) -> tuple[list[float], float]:
        """`outputs` for one row as Python numbers (the batch-1 path)."""
        return entropy_of(logits)

    @abstractmethod
    def validate(self, value: object) -> float:
        """The threshold as a float; ValueError naming the allowed range otherwise."""

    @abstractmethod
    def never_exits_early(self, thresholds: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Per row: True where the threshold cannot make the row leave before the last of `num_layers`."""

    @abstractmethod
    def step(
        self, probabilities: torch.Tensor, entropy: torch.Tensor, thresholds: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """Which rows leave at this layer, and the state for the next one.

        probabilities [..., rows, labels] and entropy [..., rows] of this layer's off-ramp; thresholds
        [rows] or [sweep, 1] (broadcasts to [sweep, rows]); state from the previous layer (None at the first).
        """

    def leaves(
        self, probabilities: Sequence[float], entropy: float, threshold: float, state: RowState
    ) -> tuple[bool, RowState]:
        """`step` for a single row given as Python numbers (the batch-1 path): whether it leaves, and its state
        for the next layer. This default runs `step` on one-element tensors; criteria override it with the
        same comparison on floats, and a test holds each override to `step`."""
        leaving, next_state = self.step(
            torch.tensor([probabilities]), torch.tensor([entropy]), torch.tensor([threshold]), state
        )
        return bool(leaving[0]), next_state

    @abstractmethod
    def candidates(self, probabilities: torch.Tensor, entropies: torch.Tensor) -> list[float]:
        """Every threshold that changes some exit on these outputs [layers, samples, ...], full depth first."""

    @abstractmethod
    def aggressiveness(self, threshold: float) -> float:
        """Orders thresholds: larger exits earlier (ties in calibration go to the more aggressive one)."""

    @abstractmethod
    def default_grid(self, num_labels: int, num_layers: int) -> list[float]:
        """The evaluation sweep's default thresholds."""

    @abstractmethod
    def exits_at_first_layer(self, num_labels: int) -> float:
        """A threshold that makes every row leave at layer 1 (for warm-ups and tests)."""

    def never_exits_early_at(self, threshold: float, num_layers: int) -> bool:
        """`never_exits_early` for one threshold as a Python number (the batch-1 path). This default asks
        the tensor version; criteria override it with the same comparison on floats (tested equal)."""
        return bool(self.never_exits_early(torch.tensor([threshold]), num_layers)[0])

    def can_exit_early(self, thresholds: torch.Tensor, num_layers: int) -> bool:
        """False when no row can leave before the last layer, so intermediate off-ramps can be skipped."""
        return bool(thresholds.numel()) and not bool(self.never_exits_early(thresholds, num_layers).all())

    def first_exit_layers(
        self, probabilities: torch.Tensor, entropies: torch.Tensor, thresholds: torch.Tensor
    ) -> torch.Tensor:
        """0-based exit layer per sample from precomputed outputs: probabilities [layers, samples, labels]
        and entropies [layers, samples]; thresholds [samples], or [sweep, 1] for a sweep ([sweep, samples]).
        Applies `step` layer by layer exactly as the serving loop does; the last layer always exits."""
        num_layers = entropies.shape[0]
        state: State = None
        exit_layer: torch.Tensor | None = None
        for layer in range(num_layers - 1):
            leaving, state = self.step(probabilities[layer], entropies[layer], thresholds, state)
            if exit_layer is None:
                exit_layer = torch.full(leaving.shape, num_layers - 1, dtype=torch.long)
            fresh = leaving & (exit_layer == num_layers - 1)
            exit_layer = torch.where(fresh, torch.full_like(exit_layer, layer), exit_layer)
        if exit_layer is None:  # a one-layer model
            shape = torch.broadcast_shapes(thresholds.shape, entropies.shape[1:])
            exit_layer = torch.zeros(shape, dtype=torch.long)
        return exit_layer


class EntropyCriterion(ExitCriterion):
    """DeeBERT: leave when the off-ramp's entropy (nats) is below S; S = 0 is full depth."""

    name = "entropy"
    full_depth = 0.0
    meaning = "entropy threshold in nats (a number >= 0, 0 = full depth)"
    SWEEP_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)

    def validate(self, value: object) -> float:
        number = _finite_number(value)
        if number < 0:
            raise ValueError(f"threshold must be >= 0, got {number}")
        return number

    def never_exits_early(self, thresholds: torch.Tensor, num_layers: int) -> torch.Tensor:
        return thresholds <= 0

    def never_exits_early_at(self, threshold: float, num_layers: int) -> bool:
        return threshold <= 0

    def step(
        self, probabilities: torch.Tensor, entropy: torch.Tensor, thresholds: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        return entropy < thresholds, None

    def leaves(
        self, probabilities: Sequence[float], entropy: float, threshold: float, state: RowState
    ) -> tuple[bool, RowState]:
        return entropy < threshold, None

    in_graph = True

    def graph_leaves(self, logits: str, negated_threshold: str, leaves: str, prefix: str) -> list[Any]:
        """entropy < S as Σ p·log p > −S, with log p from a (stable) log-softmax, in the graph's precision: five
        operators."""
        from onnx import helper

        log_p, p, p_log_p, axis, sum_p_log_p = (prefix + name for name in ("log_p", "p", "p_log_p", "axis", "sum"))
        return [
            helper.make_node("LogSoftmax", [logits], [log_p], axis=-1),
            helper.make_node("Exp", [log_p], [p]),
            helper.make_node("Mul", [p, log_p], [p_log_p]),
            helper.make_node("Constant", [], [axis], value_ints=[-1]),
            helper.make_node("ReduceSum", [p_log_p, axis], [sum_p_log_p], keepdims=0),
            helper.make_node("Greater", [sum_p_log_p, negated_threshold], [leaves]),
        ]

    def candidates(self, probabilities: torch.Tensor, entropies: torch.Tensor) -> list[float]:
        """0 and the midpoints between distinct intermediate off-ramp entropies (and one above them all)."""
        values = torch.unique(entropies[:-1].reshape(-1)).double()
        if values.numel() == 0:
            return [0.0]
        return [0.0, *_midpoints(values), float(values[-1]) * 1.0001 + 1e-6]

    def aggressiveness(self, threshold: float) -> float:
        return threshold

    def default_grid(self, num_labels: int, num_layers: int) -> list[float]:
        """The paper's range for two classes (0 … 0.7 nats), scaled by ln(C)/ln(2)."""
        scale = math.log(num_labels) / math.log(2)
        return [round(f * scale, 4) for f in self.SWEEP_FRACTIONS]

    def exits_at_first_layer(self, num_labels: int) -> float:
        return math.log(num_labels) + 1.0  # above the largest possible entropy, ln(C)


class LabelEntropyCriterion(EntropyCriterion):
    """Multi-label classifiers (one sigmoid per label): leave when every label's binary entropy (nats) is below
    S, i.e. the off-ramp is sure of each label being on or off; S = 0 is full depth. The largest possible
    entropy is ln 2 whatever the number of labels."""

    name = "label-entropy"
    in_graph = False  # sigmoids, not a softmax: no graph form
    meaning = "largest per-label binary entropy in nats (a number >= 0, 0 = full depth)"
    multi_label = True

    def graph_leaves(self, logits: str, negated_threshold: str, leaves: str, prefix: str) -> list[Any]:
        raise NotImplementedError(f"the {self.name} rule has no graph form")

    def outputs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return label_entropy_from_logits(logits)

    def outputs_of(self, logits: Sequence[float]) -> tuple[list[float], float]:
        return label_entropy_of(logits)

    def default_grid(self, num_labels: int, num_layers: int) -> list[float]:
        return [round(f, 4) for f in self.SWEEP_FRACTIONS]

    def exits_at_first_layer(self, num_labels: int) -> float:
        return math.log(2) + 1.0


class MaxProbCriterion(ExitCriterion):
    """Leave when the top class probability is >= t; t = 1 is full depth (never leaves early)."""

    name = "max-prob"
    full_depth = 1.0
    meaning = "confidence threshold (a number in [0, 1], 1 = full depth)"
    GRID = (1.0, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.87, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)

    def validate(self, value: object) -> float:
        number = _finite_number(value)
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {number}")
        return number

    def never_exits_early(self, thresholds: torch.Tensor, num_layers: int) -> torch.Tensor:
        return thresholds >= 1.0

    def never_exits_early_at(self, threshold: float, num_layers: int) -> bool:
        return threshold >= 1.0

    def step(
        self, probabilities: torch.Tensor, entropy: torch.Tensor, thresholds: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        confidence = probabilities.max(dim=-1).values
        return (confidence >= thresholds) & (thresholds < 1.0), None

    def leaves(
        self, probabilities: Sequence[float], entropy: float, threshold: float, state: RowState
    ) -> tuple[bool, RowState]:
        return max(probabilities) >= threshold and threshold < 1.0, None

    def candidates(self, probabilities: torch.Tensor, entropies: torch.Tensor) -> list[float]:
        """1 and the midpoints between distinct intermediate confidences (and one below them all)."""
        values = torch.unique(probabilities[:-1].max(dim=-1).values.reshape(-1)).double()
        values = values[values < 1.0]
        if values.numel() == 0:
            return [1.0]
        return [1.0, *reversed(_midpoints(values)), max(0.0, float(values[0]) - 1e-6)]

    def aggressiveness(self, threshold: float) -> float:
        return -threshold

    def default_grid(self, num_labels: int, num_layers: int) -> list[float]:
        return [t for t in self.GRID if t > 1.0 / num_labels]

    def exits_at_first_layer(self, num_labels: int) -> float:
        return 0.0


class PatienceCriterion(ExitCriterion):
    """PABEE: leave when the off-ramps gave the same label k layers in a row; k = 0 is full depth."""

    name = "patience"
    full_depth = 0.0
    meaning = "patience k, the layers in a row that must agree (a whole number >= 0, 0 = full depth)"

    def validate(self, value: object) -> float:
        number = _finite_number(value)
        if number < 0 or number != int(number):
            raise ValueError(f"threshold must be a whole number >= 0, got {number}")
        return number

    def never_exits_early(self, thresholds: torch.Tensor, num_layers: int) -> torch.Tensor:
        # k layers must agree, so a row leaves at layer k at the earliest: k >= n is full depth too.
        return (thresholds <= 0) | (thresholds >= num_layers)

    def never_exits_early_at(self, threshold: float, num_layers: int) -> bool:
        return threshold <= 0 or threshold >= num_layers

    def step(
        self, probabilities: torch.Tensor, entropy: torch.Tensor, thresholds: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        # state[0]: the previous layer's label per row, state[1]: how many layers in a row gave it.
        label = probabilities.argmax(dim=-1)
        if state is None:
            streak = torch.ones_like(label)
        else:
            streak = torch.where(label == state[0], state[1] + 1, torch.ones_like(label))
        leaving = (thresholds > 0) & (streak >= thresholds)
        return leaving, torch.stack([label, streak])

    def leaves(
        self, probabilities: Sequence[float], entropy: float, threshold: float, state: RowState
    ) -> tuple[bool, RowState]:
        # state: (the previous layer's label, how many layers in a row gave it).
        label = argmax(probabilities)
        streak = state[1] + 1 if state is not None and state[0] == label else 1
        return threshold > 0 and streak >= threshold, (label, streak)

    def candidates(self, probabilities: torch.Tensor, entropies: torch.Tensor) -> list[float]:
        return [0.0, *(float(k) for k in range(entropies.shape[0], 0, -1))]

    def aggressiveness(self, threshold: float) -> float:
        return -math.inf if threshold <= 0 else -threshold

    def default_grid(self, num_labels: int, num_layers: int) -> list[float]:
        return [0.0, *(float(k) for k in range(1, num_layers + 1))]

    def exits_at_first_layer(self, num_labels: int) -> float:
        return 1.0


CRITERIA: dict[str, ExitCriterion] = {
    c.name: c for c in (EntropyCriterion(), MaxProbCriterion(), PatienceCriterion(), LabelEntropyCriterion())
}
DEFAULT_CRITERION = "entropy"


def get_criterion(name: str) -> ExitCriterion:
    """The criterion called `name`; ValueError naming the known ones otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown exit criterion {name!r} (known: {', '.join(CRITERIA)})") from None
