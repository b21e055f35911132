"""The engine: the one server module that imports `model/`.

It loads the checkpoint onto the chosen device, tokenizes (before the queue), resolves thresholds
(numbers or preset names), and runs batches layer by layer, reporting each row the moment it exits.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from model.backends import BackendError, ExitModel, load_backend, pick_backend
from model.checkpoint import CheckpointError, load_model, require_deebert, resolve_directory
from model.config import ConfigError, UnknownPresetError
from model.device import DeviceError, pick_device, pick_dtype, prepare
from model.exit_rule import LABEL_ON_PROBABILITY
from model.modeling import DeeBert
from model.onnx_backend import use_session_pools
from model.onnx_export import ExportError
from model.saving import saving_from_totals
from model.tokenization import (
    Encoded,
    TruncationSide,
    load_tokenizer,
    pad_arrays,
    pad_batch,
    split_by_padding,
    split_tokens_setting,
    tokenize,
)
from model.tune import TuneError, load_auto
from server.errors import DeeBertError, ErrorType
from server.settings import ServerSettings

logger = logging.getLogger("deebert.engine")

FALLBACK_DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class RowOutcome:
    """One text's answer from the model."""

    label_id: int
    exit_layer: int
    entropy: float
    probabilities: list[float]


@dataclass(frozen=True)
class Threshold:
    """A resolved threshold of the exit criterion, with the preset name it came from (if any)."""

    value: float
    preset: str | None = None


@dataclass(frozen=True)
class LadderExits:
    """One text run to full depth, read at every rung of a threshold ladder: its full-depth label, whether an
    exit at each rung gives that label, and the layer (1..n) it would leave at."""

    full_label: int
    agrees: tuple[bool, ...]
    exit_layers: tuple[int, ...]


class EngineLoadError(RuntimeError):
    """The checkpoint could not be loaded for serving."""


class Engine:
    """A loaded model ready to classify batches of tokenized texts."""

    def __init__(
        self,
        model: ExitModel,
        tokenizer: object,
        device: torch.device | None = None,
        max_length: int | None = None,
        default_threshold: str | None = None,
        compaction: bool = True,
        split_tokens: int | None = None,
        stream_model: ExitModel | None = None,
        streams: int = 1,
    ) -> None:
        """`split_tokens`: a batch runs as several calls over rows of like length when that saves more padded
        tokens than this per extra call (`split_by_padding`); 0 never splits; None: `DEFAULT_SPLIT_TOKENS` on the
        CPU, 0 on other devices and for layers that skip the padding themselves (`split_tokens_setting`).
        `stream_model`: the model's copy on a share of the threads (`ExitModel.stream_copy`) that `streams` batches
        may run on at once (`run_batch(..., stream=True)`)."""
        if isinstance(model, DeeBert):
            model = model.to(device or model.device).eval()
        elif device is not None and device != model.device:
            raise EngineLoadError(f"the {model.backend} backend runs on {model.device}, not {device}")
        self.model = model
        self.tokenizer = tokenizer
        # A fast tokenizer sets its truncation on its backend at every call (state), so two threads calling one
        # can cut each other's texts wrong. Short inputs are tokenized on the event loop with `tokenizer`; long
        # ones on one tokenizing thread, with a copy of their own.
        self._off_loop_tokenizer = copy.deepcopy(tokenizer)
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deebert-tokenize")
        self.device = model.device
        self.config = model.config
        self.max_length = min(max_length or self.config.max_length, self.model_max_positions)
        self.pad_token_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
        self.default_threshold = self._default_threshold(default_threshold)
        self.compaction = compaction
        self.split_tokens = split_tokens_setting(split_tokens, self.device.type, model.packs_tokens)
        # Why this backend and precision serve: requested, or `auto`'s measured choice (`model.tune`).
        self.backend_reason = "given"
        if streams > 1 and stream_model is None:
            raise EngineLoadError(f"{streams} batch streams need the model's stream copy")
        self.stream_model = stream_model if streams > 1 else None
        self.streams = streams

    @classmethod
    def load(cls, settings: ServerSettings) -> Engine:
        """Load the checkpoint named by the settings onto their device, dtype and backend (ONNX Runtime's
        graphs are exported on the first start and cached)."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        try:
            device = pick_device(settings.device)
            if device.type == "cpu" and settings.batch_streams != 1:
                # Before any ONNX Runtime session, the first-start tune's included: a stream's copy of the graphs
                # needs sessions with pools of their own (`model.onnx_backend.use_session_pools`).
                use_session_pools()
            dtype = pick_dtype(settings.dtype, device)
            backend = pick_backend(settings.backend, device, dtype)
            precision = settings.precision
            prepare(device)
            directory = resolve_directory(settings.checkpoint)
            require_deebert(directory, settings.checkpoint)
            reason = "requested" if settings.backend != "auto" else f"auto on {device.type}: {backend}"
            if settings.backend == "auto" and device.type == "cpu" and settings.dtype == "auto":
                # On the CPU the fastest runtime depends on the CPU: the one `deebert tune` measured here.
                model, _, reason = load_auto(
                    directory,
                    settings.cache_dir,
                    settings.threads,
                    settings.max_batch_size,
                    settings.tune_budget_s,
                    split_tokens=settings.batch_split_tokens,  # None: each candidate's default
                )
            else:
                model = load_backend(
                    load_model(directory, dtype=dtype), backend, precision, settings.cache_dir, settings.threads
                )
            tokenizer = load_tokenizer(directory)
        except (BackendError, CheckpointError, ConfigError, DeviceError, ExportError, TuneError, OSError) as err:
            raise EngineLoadError(f"cannot serve {settings.checkpoint}: {err}") from err
        streams, stream_model = batch_streams(model, device, settings.batch_streams, settings.threads)
        engine = cls(
            model,
            tokenizer,
            device,
            settings.max_length,
            settings.default_threshold,
            settings.compaction,
            settings.batch_split_tokens,
            stream_model,
            streams,
        )
        engine.backend_reason = reason
        logger.info(
            "loaded %s (%d layers, labels %s) on %s, backend %s, %s (%s); default threshold %s; %s",
            engine.name,
            engine.num_layers,
            engine.labels,
            engine.device,
            engine.backend,
            engine.dtype_name,
            reason,
            engine.default_threshold,
            engine.describe_streams(),
        )
        return engine

    def describe_streams(self) -> str:
        """How batches run under load, in words."""
        if self.streams == 1:
            return "one batch at a time"
        return f"up to {self.streams} batches at once under load"

    # --- facts about the model -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dtype_name(self) -> str:
        """The precision the model computes in: `float32`, `float16`, `bfloat16`, or `int8` (ONNX Runtime)."""
        return self.model.precision

    @property
    def backend(self) -> str:
        """`torch`, `onnxruntime` or `openvino`."""
        return self.model.backend

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def is_pair_task(self) -> bool:
        return self.config.is_pair_task

    @property
    def is_multi_label(self) -> bool:
        """One sigmoid per label (the label-entropy exit rule), not one softmax."""
        return self.config.criterion.multi_label

    def labels_on(self, probabilities: Sequence[float]) -> list[str]:
        """A multi-label answer's labels that are on, in label order."""
        return [name for name, p in zip(self.labels, probabilities, strict=True) if p >= LABEL_ON_PROBABILITY]

    @property
    def model_max_positions(self) -> int:
        positions = int(self.config.backbone.get("max_position_embeddings", 512))
        # RoBERTa reserves padding_idx + 1 positions.
        return positions - 2 if self.config.backbone["model_type"] == "roberta" else positions

    @property
    def presets(self) -> list[dict[str, object]]:
        return [
            {"name": p.name, "threshold": p.threshold, "accuracy": p.accuracy, "expected_saving": p.expected_saving}
            for p in self.config.presets
        ]

    # --- request-side work (event loop thread) ---------------------------------------------------

    def _default_threshold(self, configured: str | None) -> Threshold:
        if configured is not None:
            try:
                return self.resolve_threshold(configured)
            except DeeBertError as err:
                raise EngineLoadError(f"DEEBERT_DEFAULT_THRESHOLD: {err.message}") from err
        if any(p.name == FALLBACK_DEFAULT_PRESET for p in self.config.presets):
            return self.resolve_threshold(FALLBACK_DEFAULT_PRESET)
        return Threshold(self.config.criterion.full_depth)

    def resolve_threshold(self, value: float | int | str | None, source: str = "threshold") -> Threshold:
        """A number or a preset name → a threshold of the checkpoint's exit criterion (DeeBERT: entropy,
        a number >= 0); 422 naming what to fix otherwise."""
        if value is None:
            return self.default_threshold
        try:
            number, preset = self.config.resolve_threshold(value)
        except UnknownPresetError as err:
            raise DeeBertError(ErrorType.UNKNOWN_PRESET, f"{source} {err}") from None
        except ValueError as err:
            raise DeeBertError(ErrorType.INVALID_THRESHOLD, f"{source}: {err}") from None
        return Threshold(number, preset)

    def tokenize(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[Encoded]:
        """Tokenize a request's texts (on the event loop); with `truncate=False` a text over the max length is a
        422, and a text the tokenizer refuses is a 422 `invalid_text` (the decoders already refuse lone
        surrogates, the known case). `truncation_side`: which end of a long text is cut ("left" or "right";
        None: the tokenizer's own)."""
        return self._tokenize(self.tokenizer, texts, text_pairs, truncate, truncation_side)

    async def tokenize_off_loop(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[Encoded]:
        """`tokenize` for long inputs (hundreds of ms of tokenizing): on the tokenizing thread, with its own
        tokenizer, while the event loop goes on."""
        call = functools.partial(self._tokenize, self._off_loop_tokenizer, texts, text_pairs, truncate, truncation_side)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, call)

    def _tokenize(
        self,
        tokenizer: object,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None,
        truncate: bool,
        truncation_side: TruncationSide | None,
    ) -> list[Encoded]:
        try:
            encoded = tokenize(
                tokenizer,  # type: ignore[arg-type]
                texts,
                text_pairs,
                self.max_length,
                truncation_side,
            )
        except (TypeError, ValueError) as err:  # texts and pairs are lists of str here: the content was refused
            raise DeeBertError(ErrorType.INVALID_TEXT, f"the tokenizer cannot encode this input: {err}") from None
        if not truncate:
            for index, item in enumerate(encoded):
                if item.truncated:
                    raise DeeBertError(
                        ErrorType.INPUT_TOO_LONG,
                        f"text {index} has {item.num_tokens_before_truncation} tokens; the maximum is "
                        f'{self.max_length}. Shorten it or send "truncate": true',
                    )
        return encoded

    # --- batch-side work (worker thread) ---------------------------------------------------------

    def run_batch(
        self,
        items: list[Encoded],
        thresholds: list[float],
        on_exit: Callable[[int, RowOutcome], None],
        stream: bool = False,
    ) -> None:
        """Run one batch layer by layer; call `on_exit(row, outcome)` for each row as it leaves. A batch of texts
        of unlike lengths runs as a few calls over rows of like length, shortest first (`split_tokens`). `stream`:
        on the stream copy, beside other batches (`streams`); otherwise on the whole model, alone."""
        model = self.stream_model if stream and self.stream_model is not None else self.model
        groups = split_by_padding([len(item) for item in items], self.split_tokens)
        if len(groups) == 1:
            self._run_call(model, items, thresholds, on_exit)
            return
        for group in groups:

            def answer(position: int, outcome: RowOutcome, group: list[int] = group) -> None:
                on_exit(group[position], outcome)  # the row's place in the whole batch

            self._run_call(model, [items[row] for row in group], [thresholds[row] for row in group], answer)

    def _run_call(
        self,
        model: ExitModel,
        items: list[Encoded],
        thresholds: list[float],
        on_exit: Callable[[int, RowOutcome], None],
    ) -> None:
        if len(items) == 1:  # a lone text: its answer as Python numbers, and no torch on a numpy runtime
            one = model.exit_lone_row(*pad_arrays(items, self.pad_token_id), thresholds[0])
            on_exit(0, RowOutcome(one.label, one.layer, one.entropy, one.probabilities))
            return
        batch = pad_batch(items, self.pad_token_id).to(self.device)
        exits_by_layer = model.iter_exits(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds, compact=self.compaction
        )
        for exits in exits_by_layer:
            probabilities = exits.probabilities.float().cpu().tolist()
            for position, row in enumerate(exits.rows):
                on_exit(
                    row,
                    RowOutcome(exits.labels[position], exits.layer, exits.entropies[position], probabilities[position]),
                )

    def full_depth_labels(self, items: list[Encoded]) -> list[int]:
        """Each text's label at full depth (shadow sampling), through the same path as a full-depth request."""
        labels = [0] * len(items)

        def keep(row: int, outcome: RowOutcome) -> None:
            labels[row] = outcome.label_id

        self.run_batch(items, [self.config.criterion.full_depth] * len(items), keep)
        return labels

    def ladder_exits(self, items: list[Encoded], ladder: Sequence[float]) -> list[LadderExits]:
        """Each text run to full depth with every off-ramp's output (what the controller's shadow samples read):
        its full-depth label, and for each threshold of `ladder` whether an exit there agrees and where it
        leaves. Plain data: what the controller concludes from it is the controller's business."""
        batch = pad_batch(items, self.pad_token_id).to(self.device)
        with torch.inference_mode():
            logits = self.model.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            probabilities, entropies = self.config.criterion.outputs(logits.float().cpu())
            thresholds = torch.tensor(list(ladder), dtype=torch.float32).unsqueeze(1)  # [rungs, 1]
            exit_layers = self.config.criterion.first_exit_layers(probabilities, entropies, thresholds)  # [rungs, rows]
            labels = probabilities.argmax(dim=-1)  # [layers, rows]
            at_exit = labels.gather(0, exit_layers)  # [rungs, rows]
            full = labels[-1]
            agrees = (at_exit == full.unsqueeze(0)).T.tolist()
            layers = (exit_layers + 1).T.tolist()
        return [
            LadderExits(label, tuple(agree), tuple(layer))
            for label, agree, layer in zip(full.tolist(), agrees, layers, strict=True)
        ]

    def threshold_ladder(self, ceiling: Threshold, rungs: int = 21) -> list[Threshold]:
        """The thresholds the controller moves the default along: full depth first, `ceiling` last, evenly
        spaced for a continuous criterion (each preset and the configured default in range replacing its nearest
        rung, so they are rungs), the criterion's own grid for a discrete one (patience)."""
        rule = self.config.criterion
        full, top = rule.full_depth, ceiling.value
        low, high = rule.aggressiveness(full), rule.aggressiveness(top)
        if high <= low:
            raise ValueError(f"the ceiling {top} does not exit earlier than full depth ({full})")
        try:
            values = [rule.validate(full + (top - full) * i / (rungs - 1)) for i in range(rungs)]
        except ValueError:  # whole-number thresholds: the criterion's grid
            grid = rule.default_grid(len(self.labels), self.num_layers)
            values = [full, *(v for v in grid if low < rule.aggressiveness(v) < high), top]
        kept = [*(p.threshold for p in self.config.presets), self.default_threshold.value]
        inside = [value for value in kept if low < rule.aggressiveness(value) < high]
        for value in inside:
            nearest = min(range(1, len(values) - 1), key=lambda i: abs(values[i] - value), default=None)
            if nearest is not None:
                values[nearest] = value
        values = sorted(set(values), key=rule.aggressiveness)
        names = {p.threshold: p.name for p in self.config.presets}
        return [Threshold(v, names.get(v)) for v in values]

    @staticmethod
    def saving_from_totals(layers_executed: float, layers_possible: float) -> float | None:
        """The paper's expected saving from Σ exit layers and n per text (`model/saving.py`, its one definition),
        for the metrics and the controller; None when nothing ran."""
        return saving_from_totals(layers_executed, layers_possible)

    def exits_earlier(self, first: Threshold, second: Threshold) -> bool:
        """True when `first` makes rows leave earlier than `second` under the checkpoint's exit criterion."""
        rule = self.config.criterion
        return rule.aggressiveness(first.value) > rule.aggressiveness(second.value)

    def rewarm(self) -> None:
        """Tokenize a short text on the event loop, while the server is idle: a forward pass leaves the tokenizer's
        code and tables out of the CPU's caches, and the next request would pay for bringing them back."""
        texts = ["a short, ordinary sentence: the next request's tokenizing finds its tables in the cache."]
        self.tokenize(texts, texts if self.is_pair_task else None, truncate=True)

    def warmup(self, batches: bool = True) -> None:
        """Run the code paths a request takes (batch 1 and, with `batches`, full batches; exits early and late) on
        the calling thread (a first forward on a fresh thread costs ~200 ms of one-off setup)."""
        texts = ["warm up", "a longer warm-up text " * 8]
        pairs = ["warm up"] * len(texts) if self.is_pair_task else None
        encoded = self.tokenize(texts, pairs, truncate=True)
        # The tokenizing thread's copy reads its tokenizer pipeline (`model.ascii_wordpiece`: ~30 ms with the GIL
        # held) now, not at the first long request.
        self._tokenize(self._off_loop_tokenizer, texts, pairs, True, None)
        rule = self.config.criterion
        full, earliest = rule.full_depth, rule.exits_at_first_layer(len(self.labels))
        for thresholds in ([full, full], [earliest, full], [earliest, earliest]):
            if batches:
                self.run_batch(encoded, thresholds, lambda row, outcome: None)
                if self.stream_model is not None:
                    self.run_batch(encoded, thresholds, lambda row, outcome: None, stream=True)
            self.run_batch(encoded[:1], thresholds[:1], lambda row, outcome: None)


# Batch streams by default on the CPU (`batch_streams`): on a 2-core AVX2-only AMD EPYC, two batches at once on one
# thread each served a median 1.04-1.07x the requests/s of one batch at a time on both threads at 32 connections and
# 1.09-1.17x at 4, every A/B pair higher; three gained nothing more (BENCHMARKS.md §28).
DEFAULT_STREAMS = 2


def batch_streams(
    model: ExitModel, device: torch.device, setting: int | None, threads: int | None
) -> tuple[int, ExitModel | None]:
    """How many batches may run at once under load, and the model's copy they run on (`ExitModel.stream_copy`, each
    call on the threads divided among the streams): `setting` (DEEBERT_BATCH_STREAMS), or by default
    `DEFAULT_STREAMS` on the CPU with at least that many threads; 1 (and no copy) where the backend has no stream
    copy, with a log line saying why."""
    if device.type != "cpu" or setting == 1:
        return 1, None
    available = threads or usable_cpus()
    wanted = setting or (DEFAULT_STREAMS if available >= DEFAULT_STREAMS else 1)
    if wanted == 1:
        return 1, None
    copy_ = model.stream_copy(max(1, available // wanted))
    if copy_ is None:
        log = logger.warning if setting else logger.info
        log(
            "batches run one at a time: the %s backend (%s) has no copy for batch streams (ONNX Runtime's, in a "
            "process whose sessions have pools of their own, has)",
            model.backend,
            model.precision,
        )
        return 1, None
    return wanted, copy_


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else the machine's)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
