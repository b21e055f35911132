"""The early-exit loop, written once for every backend: layer by layer, per-row thresholds, compaction.

A backend (PyTorch in `model.modeling`, ONNX Runtime in `model.onnx_backend`) supplies only its compute steps
(`ExitSteps`): the embeddings, one encoder layer, one off-ramp's logits, and dropping rows from the batch.
Everything that decides which rows leave — the exit rule of `model.exit_rule`, the one host sync per layer,
skipping intermediate off-ramps (or, where the backend has one, taking its one-call full forward) when no
row can leave early, compaction and trimming padding, the batch-1
path on Python numbers — lives here, so both backends answer with the same semantics and the same
`LayerExits` / `ExitResult`. Layers are numbered 1..n in everything this module returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from model import exit_rule

# A batch's token ids, mask or types: torch tensors, or int64 numpy arrays for a lone row
# (`EarlyExitModel.exit_lone_row`), so that a runtime that computes on numpy never touches torch.
Tokens = torch.Tensor | np.ndarray

if TYPE_CHECKING:
    from model.config import DeeBertConfig


@dataclass
class LayerExits:
    """The rows that left the batch at one layer (1-based), with their answers."""

    layer: int
    rows: list[int]
    labels: list[int]
    entropies: list[float]
    probabilities: torch.Tensor
    rows_run: int


@dataclass
class LoneRowExit:
    """A batch of one row's answer as Python numbers (`exit_one`): the layer it left at (1-based), its label,
    entropy and probabilities. The server's lone requests read it as it is; `layer_exits` gives the batch form."""

    layer: int
    label: int
    entropy: float
    probabilities: list[float]

    def layer_exits(self) -> LayerExits:
        """As the loop yields a batch's exits (the probabilities as a [1, labels] tensor)."""
        return LayerExits(
            layer=self.layer,
            rows=[0],
            labels=[self.label],
            entropies=[self.entropy],
            # from numpy: a third of torch.tensor's cost on a list, measured right after an ORT call
            probabilities=torch.from_numpy(np.array([self.probabilities], dtype=np.float32)),
            rows_run=1,
        )


@dataclass
class ExitResult:
    """Per-row early-exit answers for a whole batch, in input order."""

    exit_layer: list[int]
    entropy: list[float]
    label: list[int]
    probabilities: torch.Tensor
    rows_per_layer: list[int] = field(default_factory=list)

    @property
    def layers_executed(self) -> int:
        """Row-layers actually computed (what compaction saves)."""
        return sum(self.rows_per_layer)


class ExitSteps(Protocol):
    """A backend's compute steps. `state` is the backend's own record of the rows still running (their
    hidden states and attention mask, right-padded); the loop only passes it back.

    A backend that computes on numpy may also give a lone row's logits as Python numbers, without torch
    (`exit_one` looks them up): `full_depth_row(input_ids, attention_mask, token_type_ids) -> list[float] | None`
    and `off_ramp_row(state, layer_number) -> list[float]`."""

    @property
    def num_layers(self) -> int: ...

    def start(self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None) -> Any:
        """The embeddings of a batch: the state before layer 1."""

    def run_layer(self, state: Any, layer_number: int) -> Any:
        """The state after encoder layer `layer_number` (1-based)."""

    def off_ramp_logits(self, state: Any, layer_number: int) -> torch.Tensor:
        """Off-ramp `layer_number`'s logits for the rows in `state`, [rows, labels] on the loop's device."""

    def keep_rows(self, state: Any, keep_index: torch.Tensor) -> Any:
        """The state of only the rows at `keep_index` (ascending), without padding none of them needs."""

    # True when a state's arrays are the runtime's own output buffers, which the same layer's next call
    # overwrites (OpenVINO's): rows that wait across calls are copied out before that call.
    borrows_outputs: bool

    def join(self, parts: Sequence[tuple[Any, torch.Tensor]]) -> Any:
        """The rows at each part's index (ascending) of its state, all after the same layer, as one state in
        the order given, padded to the longest row (masked): what a call refilled between layers runs. One
        copy of each row; without padding no row needs."""

    def full_depth_logits(
        self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None
    ) -> torch.Tensor | None:
        """The final classifier's logits from one full forward, when the backend has a faster way to run all
        layers than one step at a time (the loop takes it when no row can leave early); None otherwise."""


def _only(thresholds: Sequence[float] | torch.Tensor) -> float:
    """The threshold of a batch of one row."""
    values = thresholds.reshape(-1).tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
    if len(values) != 1:
        raise ValueError(f"a batch of 1 row needs 1 threshold, got {len(values)}")
    return float(values[0])


def _leaving(
    layer: int,
    rows: torch.Tensor,
    leaving_index: torch.Tensor,
    probabilities: torch.Tensor,
    entropy: torch.Tensor,
    rows_run: int,
) -> LayerExits:
    """The rows at `leaving_index` of a call at `layer` (their numbers in `rows`), with their answers."""
    return LayerExits(
        layer=layer,
        rows=rows[leaving_index].tolist(),
        labels=probabilities[leaving_index].argmax(dim=-1).tolist(),
        entropies=entropy[leaving_index].tolist(),
        probabilities=probabilities[leaving_index],
        rows_run=rows_run,
    )


def iter_exits(
    steps: ExitSteps,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    thresholds: Sequence[float] | torch.Tensor,
    rule: exit_rule.ExitCriterion,
    compact: bool = True,
) -> Iterator[LayerExits]:
    """Run layer by layer and yield the rows that leave at each layer, as soon as they leave.

    Each row has its own threshold of the exit criterion. With `compact`, rows that left are removed from the
    batch, so later layers run only on the rows still going; without it they stay in the batch (masked) until
    every row has left, which is what a batch costs without compaction. Inputs must be right-padded, as
    `model.tokenization` pads them. Yields only layers where rows leave. A batch of one row takes `exit_one`,
    the same computation with the exit decision on Python numbers.
    """
    batch_size = input_ids.shape[0]
    if batch_size == 1:
        yield exit_one(steps, input_ids, attention_mask, token_type_ids, _only(thresholds), rule).layer_exits()
        return
    device = input_ids.device
    num_layers = steps.num_layers
    row_thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(batch_size)
    # One host sync up front decides whether any row can leave early at all: with every threshold at
    # full depth the intermediate off-ramps cannot change an answer and are skipped (plain cost).
    may_exit_early = rule.can_exit_early(row_thresholds, num_layers)
    if not may_exit_early:
        logits = steps.full_depth_logits(input_ids, attention_mask, token_type_ids)
        if logits is not None:
            probabilities, entropy = rule.outputs(logits)
            yield LayerExits(
                layer=num_layers,
                rows=list(range(batch_size)),
                labels=probabilities.argmax(dim=-1).tolist(),
                entropies=entropy.tolist(),
                probabilities=probabilities,
                rows_run=batch_size,
            )
            return
    state = steps.start(input_ids, attention_mask, token_type_ids)
    rows = torch.arange(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    criterion_state: exit_rule.State = None
    rows_run = batch_size
    for layer_number in range(1, num_layers + 1):
        rows_run = rows.shape[0]
        state = steps.run_layer(state, layer_number)
        if layer_number < num_layers and not may_exit_early:
            continue
        probabilities, entropy = rule.outputs(steps.off_ramp_logits(state, layer_number))
        if layer_number == num_layers:
            leaving = ~done
        else:
            leaving, criterion_state = rule.step(probabilities, entropy, row_thresholds, criterion_state)
            if not compact:
                leaving &= ~done
        # The one host sync per layer: which rows leave decides what runs next.
        leaving_index = leaving.nonzero().squeeze(1)
        num_leaving = leaving_index.numel()
        if num_leaving == 0:
            continue
        yield _leaving(layer_number, rows, leaving_index, probabilities, entropy, rows_run)
        if compact:
            if num_leaving == rows_run:
                return
            keep_index = (~leaving).nonzero().squeeze(1)
            state = steps.keep_rows(state, keep_index)
            rows, row_thresholds, done = rows[keep_index], row_thresholds[keep_index], done[keep_index]
            if criterion_state is not None:
                criterion_state = criterion_state[..., keep_index]
            # The rows left may all be full-depth ones: then their off-ramps cannot change an answer.
            may_exit_early = rule.can_exit_early(row_thresholds, num_layers)
        else:
            done |= leaving
            if bool(done.all()):
                return


# A batch of rows to refill with: token ids, attention mask, token types (or None) and one threshold per row.
RefillBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Sequence[float] | torch.Tensor]


@dataclass
class _Waiting:
    """Rows that ran the layers before one layer and wait for it: the rows at `index` of `state`, their numbers
    across every batch, their thresholds and the exit criterion's per-row state.

    `state` is the state of the call they came from, shared with the other rows that went on from it: they are
    cut out of it only when they run, in one copy with the rows they run with (`whole`: they are all of its
    rows, in order, and run in it as it is), or copied out first where the runtime would overwrite it."""

    state: Any
    index: torch.Tensor
    whole: bool
    rows: torch.Tensor
    thresholds: torch.Tensor
    criterion_state: exit_rule.State
    copied: bool = False  # `state` is these rows' own copy (see `ExitSteps.borrows_outputs`)

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def copied_out(self, steps: ExitSteps) -> _Waiting:
        """These rows in a state of their own, no longer in their call's (a runtime's buffer)."""
        if self.copied:
            return self
        state = steps.keep_rows(self.state, self.index)
        index = torch.arange(self.size, device=self.rows.device)
        return _Waiting(state, index, True, self.rows, self.thresholds, self.criterion_state, copied=True)

    def split(self, count: int) -> tuple[_Waiting, _Waiting]:
        """The first `count` rows, and the rest."""
        parts = []
        for part in (slice(None, count), slice(count, None)):
            state = None if self.criterion_state is None else self.criterion_state[..., part]
            group = _Waiting(self.state, self.index[part], False, self.rows[part], self.thresholds[part], state)
            group.copied = self.copied
            parts.append(group)
        return parts[0], parts[1]


def _take(waiting: list[_Waiting], max_rows: int) -> tuple[list[_Waiting], list[_Waiting]]:
    """At most `max_rows` of the waiting rows, oldest first, and the rest."""
    taken: list[_Waiting] = []
    count = 0
    for position, group in enumerate(waiting):
        room = max_rows - count
        if group.size > room:
            head, tail = group.split(room)
            return [*taken, head], [tail, *waiting[position + 1 :]]
        taken.append(group)
        count += group.size
        if count == max_rows:
            return taken, waiting[position + 1 :]
    return taken, []


def _gather(steps: ExitSteps, groups: Sequence[_Waiting]) -> tuple[Any, torch.Tensor, torch.Tensor, exit_rule.State]:
    """The rows of `groups` as one call's state, rows, thresholds and criterion state."""
    if len(groups) == 1 and groups[0].whole:  # every row of its call went on: its state as it is
        group = groups[0]
        return group.state, group.rows, group.thresholds, group.criterion_state
    criterion_states = [group.criterion_state for group in groups]
    return (
        steps.join([(group.state, group.index) for group in groups]),
        torch.cat([group.rows for group in groups]),
        torch.cat([group.thresholds for group in groups]),
        None if any(s is None for s in criterion_states) else torch.cat(criterion_states, dim=-1),  # type: ignore[arg-type]
    )


def iter_exits_refilled(
    steps: ExitSteps, batches: Iterable[RefillBatch], rule: exit_rule.ExitCriterion, max_rows: int
) -> Iterator[LayerExits]:
    """Many batches through the exit loop with every layer's call kept full: the rows that leave free their
    places, and the next layer's call fills them with rows of later batches that reached the same layer.

    Per batch (`iter_exits`), a batch of 32 that loses half its rows at layer 1 runs its later layers on 16
    rows or fewer, and small calls use a CPU's matrix units poorly and pay a call's fixed costs for few rows.
    Here rows that reach layer k wait there until `max_rows` of them (from any batches) have, and run it
    together; the deepest such layer runs first, and a new batch starts at layer 1 only when no layer has a
    full call waiting; when the batches run out the rest drains, deepest first. Every row takes the same
    layers and off-ramps and the same exit rule as in `iter_exits` (its own threshold and criterion state);
    only which rows share a call changes (and their padding: answers agree to float precision).

    Rows are numbered across the batches in the order given (the first batch's 0..b-1, then on); exits come
    out layer by layer as calls finish, not in row order. Each batch has at most `max_rows` rows. Sort the
    rows by length first for little padding: rows that share a call are padded to the longest of them.

    A batch none of whose rows can leave early gains nothing from sharing calls: it runs on its own, as
    `iter_exits` runs it (one full-depth call where the backend has one).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    num_layers = steps.num_layers
    waiting: dict[int, list[_Waiting]] = {layer: [] for layer in range(2, num_layers + 1)}
    counts = dict.fromkeys(waiting, 0)
    source = iter(batches)
    next_row = 0
    more = True
    while True:
        layer = next((depth for depth in range(num_layers, 1, -1) if counts[depth] >= max_rows), None)
        if layer is None and more:
            batch = next(source, None)
            if batch is None:
                more = False
            else:
                input_ids, attention_mask, token_type_ids, thresholds = batch
                size = input_ids.shape[0]
                if not 1 <= size <= max_rows:
                    raise ValueError(f"a batch to refill with has 1 to {max_rows} rows, got {size}")
                device = input_ids.device
                row_thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(size)
                first_row, next_row = next_row, next_row + size
                if not rule.can_exit_early(row_thresholds, num_layers):
                    for exits in iter_exits(steps, input_ids, attention_mask, token_type_ids, row_thresholds, rule):
                        yield replace(exits, rows=[first_row + row for row in exits.rows])
                    continue
                state: Any = steps.start(input_ids, attention_mask, token_type_ids)
                rows = torch.arange(first_row, next_row, device=device)
                criterion_state: exit_rule.State = None
                layer = 1
        if layer is None:  # no full call waits and no batch is left: drain, deepest first
            layer = next((depth for depth in range(num_layers, 1, -1) if counts[depth]), None)
            if layer is None:
                return
        if steps.borrows_outputs and layer < num_layers:
            # This call overwrites the buffers the rows waiting for the next layer may still be in.
            waiting[layer + 1] = [group.copied_out(steps) for group in waiting[layer + 1]]
        if layer > 1:
            groups, waiting[layer] = _take(waiting[layer], max_rows)
            counts[layer] = sum(group.size for group in waiting[layer])
            state, rows, row_thresholds, criterion_state = _gather(steps, groups)
        rows_run = int(rows.shape[0])
        state = steps.run_layer(state, layer)
        probabilities, entropy = rule.outputs(steps.off_ramp_logits(state, layer))
        if layer == num_layers:
            leaving = torch.ones(rows_run, dtype=torch.bool, device=rows.device)
        else:
            leaving, criterion_state = rule.step(probabilities, entropy, row_thresholds, criterion_state)
        leaving_index = leaving.nonzero().squeeze(1)  # the one host sync per call
        num_leaving = leaving_index.numel()
        if num_leaving:
            yield _leaving(layer, rows, leaving_index, probabilities, entropy, rows_run)
        if num_leaving < rows_run:
            keep = (~leaving).nonzero().squeeze(1)
            going = criterion_state if criterion_state is None else criterion_state[..., keep]
            waiting[layer + 1].append(_Waiting(state, keep, num_leaving == 0, rows[keep], row_thresholds[keep], going))
            counts[layer + 1] += rows_run - num_leaving


def infer_refilled(
    steps: ExitSteps,
    batches: Sequence[RefillBatch],
    rule: exit_rule.ExitCriterion,
    num_labels: int,
    max_rows: int,
) -> ExitResult:
    """Early-exit answers for every row of `batches`, numbered across them in order (`iter_exits_refilled`).
    `rows_per_layer`: every row runs each layer up to the one it leaves at, and no further."""
    answers = _Answers(sum(int(batch[0].shape[0]) for batch in batches), num_labels)
    for exits in iter_exits_refilled(steps, batches, rule, max_rows):
        answers.record(exits)
    rows_per_layer = [sum(1 for exit_layer in answers.exit_layer if exit_layer >= depth)
                      for depth in range(1, steps.num_layers + 1)]  # fmt: skip
    return answers.result(rows_per_layer)


def exit_one(
    steps: ExitSteps,
    input_ids: Tokens,
    attention_mask: Tokens,
    token_type_ids: Tokens | None,
    threshold: float,
    rule: exit_rule.ExitCriterion,
) -> LoneRowExit:
    """Where a batch of one row leaves, and its answer: the same layers and off-ramps as `iter_exits`, then
    the softmax, entropy and exit decision on the off-ramp's few logits as Python numbers
    (`exit_rule.entropy_of`, `rule.leaves`).

    At batch 1 the tensor version of those steps (log-softmax, exp, product, sum, comparison, nonzero,
    gathers, and the bookkeeping of which rows remain) is dozens of operator dispatches for a handful of
    numbers; reading the logits once (the host sync the decision needs anyway) and deciding in Python
    leaves the off-ramp's own work as its cost.

    A backend with `exit_in_one_call` (the exit graph of ONNX Runtime and OpenVINO) runs all of that in one
    runtime call when the rule has a graph form (`rule.in_graph`); it returns the exit layer and that off-ramp's
    logits, from which the answer is read as here. A backend that computes on numpy reads a lone row's logits
    without torch (`full_depth_row`, `off_ramp_row`): right after a runtime call has filled the CPU's caches with
    the model's weights, the first torch operation costs ~50 µs on its own (BENCHMARKS.md §26).
    """
    num_layers = steps.num_layers
    may_exit_early = not rule.never_exits_early_at(threshold, num_layers)
    one_call = getattr(steps, "exit_in_one_call", None) if may_exit_early and rule.in_graph else None
    found = None if one_call is None else one_call(input_ids, attention_mask, token_type_ids, threshold)
    if found is not None:  # the backend ran the loop, and decided by the same rule, in one call
        layer, logits = found
        return _one_row_exit(layer, *rule.outputs_of(logits))
    full_depth = None if may_exit_early else _full_depth_row(steps, input_ids, attention_mask, token_type_ids)
    state = None if full_depth is not None else steps.start(input_ids, attention_mask, token_type_ids)
    off_ramp_row = getattr(steps, "off_ramp_row", None)
    row_state: exit_rule.RowState = None
    for layer_number in range(1, num_layers + 1):
        if full_depth is not None:  # the backend ran every layer in one call
            if layer_number < num_layers:
                continue
            logits = full_depth
        else:
            state = steps.run_layer(state, layer_number)
            if layer_number < num_layers and not may_exit_early:
                continue
            if off_ramp_row is not None:
                logits = off_ramp_row(state, layer_number)
            else:
                logits = steps.off_ramp_logits(state, layer_number).tolist()[0]
        probabilities, entropy = rule.outputs_of(logits)
        if layer_number < num_layers:
            leaving, row_state = rule.leaves(probabilities, entropy, threshold, row_state)
            if not leaving:
                continue
        return _one_row_exit(layer_number, probabilities, entropy)
    raise ValueError("a DeeBERT model needs at least one layer")


def _full_depth_row(
    steps: ExitSteps, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None
) -> list[float] | None:
    """A lone row's final logits from the backend's one-call full forward, as Python numbers (None without one)."""
    full_depth_row = getattr(steps, "full_depth_row", None)
    if full_depth_row is not None:
        return full_depth_row(input_ids, attention_mask, token_type_ids)  # type: ignore[no-any-return]
    logits = steps.full_depth_logits(input_ids, attention_mask, token_type_ids)
    return None if logits is None else logits.tolist()[0]


def _one_row_exit(layer: int, probabilities: list[float], entropy: float) -> LoneRowExit:
    """A lone row's answer at the layer it left."""
    return LoneRowExit(layer, exit_rule.argmax(probabilities), entropy, probabilities)


class _Answers:
    """Each row's answer as its exit comes in (rows numbered 0..rows-1), then the `ExitResult`."""

    def __init__(self, rows: int, num_labels: int) -> None:
        self.exit_layer, self.entropy, self.label = [0] * rows, [0.0] * rows, [0] * rows
        self.probabilities = torch.zeros(rows, num_labels)

    def record(self, exits: LayerExits) -> None:
        for position, row in enumerate(exits.rows):
            self.exit_layer[row] = exits.layer
            self.entropy[row] = exits.entropies[position]
            self.label[row] = exits.labels[position]
        self.probabilities[exits.rows] = exits.probabilities.float().cpu()

    def result(self, rows_per_layer: list[int]) -> ExitResult:
        return ExitResult(self.exit_layer, self.entropy, self.label, self.probabilities, rows_per_layer)


def infer(
    steps: ExitSteps,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    thresholds: Sequence[float] | torch.Tensor,
    rule: exit_rule.ExitCriterion,
    num_labels: int,
    compact: bool = True,
) -> ExitResult:
    """Early-exit answers for the whole batch (collects `iter_exits`)."""
    batch_size = input_ids.shape[0]
    if batch_size == 1:
        one = exit_one(steps, input_ids, attention_mask, token_type_ids, _only(thresholds), rule).layer_exits()
        return ExitResult([one.layer], one.entropies, one.labels, one.probabilities, [1] * one.layer)
    answers = _Answers(batch_size, num_labels)
    rows_per_layer: list[int] = []
    for exits in iter_exits(steps, input_ids, attention_mask, token_type_ids, thresholds, rule, compact):
        rows_per_layer.extend([exits.rows_run] * (exits.layer - len(rows_per_layer)))
        answers.record(exits)
    return answers.result(rows_per_layer)


class EarlyExitModel:
    """What every backend's model offers the engine and evaluation: `iter_exits` and `infer` over its
    `exit_steps()`, plus the facts and the full-depth passes each backend implements."""

    config: DeeBertConfig
    # Whether the steps compute with torch modules, which then run under `torch.inference_mode` (a backend
    # that computes elsewhere skips entering it: at batch 1 that is a measurable share of a request).
    computes_in_torch = True
    # Whether the layers skip a batch's padding themselves (`model.onnx_export.pack_tokens`): then a batch of texts
    # of mixed lengths runs as one call, not split by length (`model.tokenization.split_tokens_setting`).
    packs_tokens = False

    @property
    def backend(self) -> str:
        """`torch` or `onnxruntime`."""
        raise NotImplementedError

    @property
    def precision(self) -> str:
        """What it computes in: `float32`, `float16`, `bfloat16`, or `int8`."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def stream_copy(self, threads: int) -> EarlyExitModel | None:
        """A copy computing on `threads` threads per call that several batch streams may call at once, for a
        server that runs batches side by side under load; None where the backend has none (torch's threads are
        the process's; OpenVINO's compiled graphs hand out their own buffers, one stream at a time)."""
        return None

    def eval(self) -> EarlyExitModel:
        """Inference mode (a torch model turns dropout off; nothing to do elsewhere)."""
        return self

    def exit_steps(self) -> ExitSteps:
        """The backend's compute steps for one pass of the loop."""
        raise NotImplementedError

    def plain_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final classifier's logits from a plain full forward: the baseline that exits cost against."""
        raise NotImplementedError

    def all_off_ramp_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Every off-ramp's logits, [layers, batch, labels], without gradients (evaluation sweeps)."""
        raise NotImplementedError

    def _inference_mode(self) -> contextlib.AbstractContextManager[Any]:
        """`torch.inference_mode` where the steps compute in torch; elsewhere nothing (entering even a disabled
        inference mode is several dispatcher calls, a measurable share of a batch-1 request)."""
        return torch.inference_mode() if self.computes_in_torch else contextlib.nullcontext()

    def iter_exits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> Iterator[LayerExits]:
        """Run layer by layer and yield the rows that leave at each layer, as soon as they leave
        (`iter_exits`; default criterion: the checkpoint's, DeeBERT's entropy)."""
        rule = criterion or self.config.criterion
        steps = self.exit_steps()
        with self._inference_mode():
            yield from iter_exits(steps, input_ids, attention_mask, token_type_ids, thresholds, rule, compact)

    def exit_lone_row(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray,
        threshold: float,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> LoneRowExit:
        """A batch of one row (int64 numpy arrays, `model.tokenization.pad_arrays`), its answer as Python numbers
        (`exit_one`): what the server runs for a lone request. The steps take the arrays as they are: a runtime that
        computes on numpy never touches torch, and PyTorch's steps make tensors on the model's device."""
        rule = criterion or self.config.criterion
        with self._inference_mode():
            return exit_one(self.exit_steps(), input_ids, attention_mask, token_type_ids, threshold, rule)

    def infer(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> ExitResult:
        """Early-exit answers for the whole batch (`infer`)."""
        rule = criterion or self.config.criterion
        steps = self.exit_steps()
        with self._inference_mode():
            return infer(
                steps, input_ids, attention_mask, token_type_ids, thresholds, rule, self.config.num_labels, compact
            )

    def iter_exits_refilled(
        self,
        batches: Iterable[RefillBatch],
        max_rows: int,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> Iterator[LayerExits]:
        """Many batches with every layer's call refilled up to `max_rows` rows (`iter_exits_refilled`)."""
        rule = criterion or self.config.criterion
        steps = self.exit_steps()
        with self._inference_mode():
            yield from iter_exits_refilled(steps, batches, rule, max_rows)

    def infer_refilled(
        self,
        batches: Sequence[RefillBatch],
        max_rows: int,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> ExitResult:
        """Early-exit answers for every row of `batches`, numbered across them (`infer_refilled`)."""
        rule = criterion or self.config.criterion
        steps = self.exit_steps()
        with self._inference_mode():
            return infer_refilled(steps, batches, rule, self.config.num_labels, max_rows)
