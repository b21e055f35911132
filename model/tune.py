"""Which runtime and precision serve a checkpoint fastest on this machine, chosen by measurement.

`deebert tune` (and a short tune at the server's first start with `--backend auto`) loads every candidate the
machine can run — torch fp32/bf16, ONNX Runtime fp32/int8, OpenVINO fp32/bf16 — and measures each on the
checkpoint's tune sample (`tune_sample.jsonl`: a few hundred texts with the fp32 full-depth answers, and labels
where the checkpoint has them): batch-1 latency and throughput at the server's max batch size, at `balanced`.

A candidate is eligible only if, at `balanced`, its labels agree with fp32's on at least 99.5 % of the sample
and (with labels) its accuracy is within 0.5 point of fp32 full depth. The fastest eligible one for the
objective wins; the choice is cached under a key of the CPU (model name and flags), the checkpoint's weights,
the runtimes' versions and the settings measured, so another machine, other weights or an upgraded runtime
tune again. Every number is measured here, on the machine at hand: nothing is assumed about which runtime wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.tokenization import DEFAULT_SPLIT_TOKENS, split_tokens_setting

logger = logging.getLogger("deebert.tune")

SAMPLE_FILE = "tune_sample.jsonl"
# 2: OpenVINO is measured under a preloaded jemalloc too; 3: OpenVINO bf16 hands over bf16, close calls retimed;
# 4: close calls retimed text by text on CLOSE_CALL_TEXTS texts (the key holds deebert's code digest too);
# 5: close calls in batches retimed too (batch by batch on CLOSE_CALL_BATCHED_TEXTS texts); 6: batches timed as
# the server runs texts arriving one per request (in the sample's order, split as DEEBERT_BATCH_SPLIT_TOKENS
# splits them), not length-sorted; 7: each candidate's batches split as the server would split them for it (whole for
# ONNX Runtime fp32's packed layers); 8: close calls shortened to fit the budget rather than skipped, and a split
# only past SPLIT_MARGIN unless timed side by side
TUNE_FORMAT = 8
MIN_AGREEMENT = 0.995  # labels at balanced equal to fp32's at balanced
MAX_ACCURACY_DROP = 0.005  # balanced accuracy below fp32 full depth (a fraction: 0.5 point)
# Two eligible candidates this close at batch 1 (the slower's ms at most this times the faster's) are timed again
# side by side, in alternating order, before one is chosen: timed one after another, a VM's slow spell during one
# of them decided it (BENCHMARKS.md §13: 2.43 against 2.08 ms in one tune, 1.79 against 2.05 in another). A slow
# spell can be deep: one first-start tune on an AVX2-only EPYC measured ONNX Runtime fp32 at 6.79 ms and 174 texts/s
# against OpenVINO fp32's 4.74 ms and 314/s, where it runs 2.7 ms and ~420/s (BENCHMARKS.md §23), and the server
# then served the slower runtime. Within 2x, the two fastest are timed again (when the budget allows).
CLOSE_CALL = 2.0
CLOSE_CALL_ROUNDS = 4
# ... on this many texts of the sample (all of it if fewer), whatever the timing's batch-1 rows: each text's
# fastest pass counts, so a slow spell costs a text one pass, not a candidate its pass. With the 40 texts of the
# first-start tune a close call went either way (BENCHMARKS.md §18: ONNX Runtime fp32 1.80 against OpenVINO bf16's
# 1.78 ms in one tune, 1.67 against 1.94 in the next, where peers' 300 texts put them at 1.50-1.54 and 1.70-1.82).
CLOSE_CALL_TEXTS = 200
# The same in batches, for the two fastest eligible in batches (texts/s within CLOSE_CALL), batch by batch on this
# many texts of the sample: each call's fastest pass counts. The first-start tune's one pass over 160 texts
# went either way on an AVX2-only EPYC (BENCHMARKS.md §19: ONNX Runtime fp32 324 against OpenVINO fp32's 335 texts/s
# in one tune, 356-378 against 296-324 in four others, where peers' 872 texts put them at 413 and 330).
CLOSE_CALL_BATCHED_TEXTS = 400
# Where the time left in a bounded tune does not allow a whole close call, a shorter one on the first texts that
# fit, down to this many alone and this many batches: side by side on fewer texts still beats the one pass each had
# before it. A first-start tune of 108 s (exports included, 120 s budget) left no time for the close call in
# batches, and its one pass each served batches on OpenVINO fp32 (261 texts/s) over ONNX Runtime fp32 (251), where
# peers measured 246-268 against 308-343 (BENCHMARKS.md §27).
CLOSE_CALL_MIN_TEXTS = 40
CLOSE_CALL_MIN_BATCHES = 2
# With a split, batches go to another runtime than the batch-1 choice only when it is ahead of it in batches by more
# than this, or both were timed side by side: one pass each varied by about a tenth between tunes (§19), and a
# second runtime costs its memory and its load.
SPLIT_MARGIN = 1.15
# split: the fastest eligible runtime alone serves batches of one, the fastest in batches serves the rest.
OBJECTIVES = ("split", "mixed", "latency", "throughput")


class TuneError(ValueError):
    """The tune cannot run (no candidate, an unreadable sample)."""


@dataclass(frozen=True)
class Candidate:
    """One runtime in one precision."""

    backend: str  # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16 | int8

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torch model is loaded in (only torch computes in it; the others export from fp32)."""
        return torch.bfloat16 if self.backend == "torch" and self.precision == "bf16" else torch.float32

    @property
    def backend_precision(self) -> str:
        """The precision `load_backend` takes (torch's is its dtype)."""
        return "fp32" if self.backend == "torch" else self.precision

    @staticmethod
    def parse(key: str) -> Candidate:
        backend, _, precision = key.partition("-")  # backend names have no hyphen; int8-static does
        return Candidate(backend, precision)


# In the order a time-bounded tune measures them: the fp32 default first, then what tends to win.
ALL_CANDIDATES = (
    Candidate("onnxruntime", "fp32"),
    Candidate("openvino", "bf16"),
    Candidate("openvino", "fp32"),
    Candidate("onnxruntime", "int8"),
    Candidate("openvino", "int8-static"),
    Candidate("onnxruntime", "int8-static"),
    Candidate("torch", "fp32"),
    Candidate("torch", "bf16"),
)


def cpu_description() -> tuple[str, list[str]]:
    """This CPU's model name and feature flags (Linux /proc/cpuinfo; the platform's name elsewhere)."""
    name, flags = platform.processor() or platform.machine(), list[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(value.split())
    return name, flags


def has_native_bf16(flags: Sequence[str]) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def available_candidates(
    flags: Sequence[str] | None = None, has_int8_ranges: bool = True
) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates this machine can run (static int8 only for a checkpoint with stored ranges), and why each
    other one is left out."""
    from model.onnx_backend import onnxruntime_available
    from model.openvino_backend import openvino_available, openvino_unavailable_reason, supported_precisions

    flags = cpu_description()[1] if flags is None else flags
    runnable: list[Candidate] = []
    skipped: dict[str, str] = {}
    for candidate in ALL_CANDIDATES:
        if candidate.backend == "onnxruntime" and not onnxruntime_available():
            skipped[candidate.key] = "onnxruntime is not installed"
        elif candidate.backend == "openvino" and not openvino_available():
            skipped[candidate.key] = openvino_unavailable_reason() or "openvino cannot run here"
        elif candidate.precision == "int8-static" and not has_int8_ranges:
            skipped[candidate.key] = "the checkpoint has no int8 ranges (deebert calibrate --calibration-data)"
        elif candidate.key == "openvino-bf16" and "bf16" not in supported_precisions():
            skipped[candidate.key] = "OpenVINO reports no BF16 capability on this CPU"
        elif candidate.key == "torch-bf16" and not has_native_bf16(flags):
            skipped[candidate.key] = "no native bf16 on this CPU (no avx512_bf16 / amx_bf16)"
        else:
            runnable.append(candidate)
    return runnable, skipped


# --- the sample -----------------------------------------------------------------------------------------


@dataclass
class TuneSample:
    """Texts (pairs for a pair task) with the fp32 full-depth label of each, and gold labels where known."""

    texts: list[str]
    text_pairs: list[str] | None
    full_depth_labels: list[int]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def write(self, directory: Path) -> Path:
        path = directory / SAMPLE_FILE
        with path.open("w") as handle:
            for row, text in enumerate(self.texts):
                record: dict[str, Any] = {"text": text}
                if self.text_pairs is not None:
                    record["text_pair"] = self.text_pairs[row]
                record["full_depth_label"] = self.full_depth_labels[row]
                if self.labels is not None:
                    record["label"] = self.labels[row]
                handle.write(json.dumps(record) + "\n")
        return path

    @staticmethod
    def read(directory: Path) -> TuneSample | None:
        """The checkpoint's sample; None when it has none. TuneError for a malformed one."""
        path = directory / SAMPLE_FILE
        if not path.is_file():
            return None
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            texts = [str(r["text"]) for r in records]
            pairs = [str(r["text_pair"]) for r in records] if records and "text_pair" in records[0] else None
            full = [int(r["full_depth_label"]) for r in records]
            labels = [int(r["label"]) for r in records] if records and "label" in records[0] else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise TuneError(f"{path} is not a tune sample: {err}") from err
        if not texts:
            raise TuneError(f"{path} holds no texts")
        return TuneSample(texts, pairs, full, labels)


def make_sample(model: Any, tokenizer: Any, dataset: Any, size: int = 400, seed: int = 0) -> TuneSample:
    """`size` rows of `dataset` (seeded), answered by `model` (fp32 torch) at full depth."""
    from model.tokenization import pad_batch, tokenize

    rows = sorted(random.Random(seed).sample(range(len(dataset)), min(size, len(dataset))))
    texts = [dataset.texts[r] for r in rows]
    pairs = [dataset.text_pairs[r] for r in rows] if dataset.text_pairs is not None else None
    encoded = tokenize(tokenizer, texts, pairs, model.config.max_length)
    pad_id = int(tokenizer.pad_token_id or 0)
    full: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), 64):
            batch = pad_batch(encoded[start : start + 64], pad_id)
            logits = model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            full += logits.argmax(dim=-1).tolist()
    labels = [dataset.labels[r] for r in rows] if dataset.labels is not None else None
    return TuneSample(texts, pairs, full, labels)


def synthetic_sample(tokenizer: Any, pair_task: bool, size: int = 128, seed: int = 0) -> TuneSample:
    """Texts of random vocabulary words, for timing a checkpoint that ships no sample (no answers to check)."""
    vocabulary = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2] or ["text"]
    generator = random.Random(seed)

    def text() -> str:
        return " ".join(generator.choice(vocabulary) for _ in range(generator.randint(4, 40)))

    texts = [text() for _ in range(size)]
    pairs = [text() for _ in range(size)] if pair_task else None
    return TuneSample(texts, pairs, full_depth_labels=[])


# --- measuring ------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One candidate's numbers on the sample, and whether it may serve."""

    candidate: str
    batch1_ms: float | None = None
    batched_per_s: float | None = None
    threshold: float | None = None
    balanced_agreement: float | None = None  # labels at balanced equal to fp32's at balanced
    full_depth_agreement: float | None = None  # labels at full depth equal to fp32's full depth
    balanced_accuracy: float | None = None
    expected_saving: float | None = None
    eligible: bool = False
    reason: str = ""
    batch1_retimed: bool = False  # batch1_ms is from a side-by-side retiming (`settle_close_call`)
    batched_retimed: bool = False  # batched_per_s is, too
    seconds: float | None = None  # what measuring it took in the tune (its export and load included)


@dataclass
class Timing:
    """Clock and sample sizes of a tune (smaller for the bounded tune at a server's first start)."""

    batch1_rows: int = 100
    batched_rows: int = 400
    batch_size: int = 32
    rounds: int = 2
    clock: Callable[[], float] = time.perf_counter
    # Batches as the server runs texts that arrive one per request: in the sample's order, each batch split into
    # calls over texts of like length at this setting (`arrival_batches`; the server's DEEBERT_BATCH_SPLIT_TOKENS;
    # None: each candidate's default, as the server would split for it, `candidate_split_tokens`).
    split_tokens: int | None = None
    # Also the labels at full depth against the sample's fp32 full-depth labels (stored in the result; no rule or
    # table reads them). The first-start tune leaves them out: on an AVX2-only EPYC that took its runs from 95-98 s
    # to 67-68 s, and the close call in batches they had crowded out of the budget had been left to one pass each,
    # which decided the server's runtime (BENCHMARKS.md §27).
    full_depth_agreement: bool = True


def describe_split(setting: int | None) -> str:
    """How the tune splits its batches, in words."""
    if setting is None:
        return f"the server's default: {DEFAULT_SPLIT_TOKENS} tokens a call, whole for packed layers"
    return f"{setting} tokens a call" if setting else "whole"


def candidate_split_tokens(model: Any, setting: int | None) -> int:
    """The split setting the server would run `model` with on the CPU under DEEBERT_BATCH_SPLIT_TOKENS=`setting`
    (None: unset, whole batches for packed layers)."""
    return split_tokens_setting(setting, "cpu", model.packs_tokens)


def _answers(model: Any, batches: Sequence[Any], threshold: float) -> list[int]:
    return _answers_and_layers(model, batches, threshold)[0]


def _answers_and_layers(model: Any, batches: Sequence[Any], threshold: float) -> tuple[list[int], list[int]]:
    """Labels and exit layers of every row of `batches` at `threshold`."""
    labels: list[int] = []
    layers: list[int] = []
    for batch in batches:
        rows = batch.input_ids.shape[0]
        result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * rows)
        labels += result.label
        layers += result.exit_layer
    return labels, layers


def time_candidate(
    model: Any, encoded: Sequence[Any], pad_id: int, threshold: float, timing: Timing
) -> tuple[float, float]:
    """(batch-1 mean ms, batched texts/s) at `threshold`: a warm-up pass, then the best of `timing.rounds`."""
    singles = batch1_inputs(encoded, pad_id, timing)
    timed = encoded[: timing.batched_rows]
    batches = batched_inputs(timed, pad_id, timing.batch_size, candidate_split_tokens(model, timing.split_tokens))
    best_single, best_batched = float("inf"), float("inf")
    for round_number in range(timing.rounds + 1):  # round 0 warms the runtime's kernels for these shapes
        single = batch1_pass_ms(model, singles, threshold, timing.clock)
        started = timing.clock()
        _answers(model, batches, threshold)
        batched = timing.clock() - started
        if round_number:
            best_single, best_batched = min(best_single, single), min(best_batched, batched)
    return best_single, len(timed) / best_batched


def batched_inputs(encoded: Sequence[Any], pad_id: int, batch_size: int, split_tokens: int) -> list[Any]:
    """The calls the server makes of `encoded` arriving in order, one text per request: batches of up to
    `batch_size`, each split into calls over texts of like length at `split_tokens` (0: whole), each call padded
    to its longest text. (Length-sorted batches, what an offline pass would run, flatter every runtime, and some
    more than others: on an AVX2-only AMD EPYC splitting gained ONNX Runtime 1.37x and OpenVINO 1.17x.)"""
    from model.tokenization import arrival_batches, pad_batch

    calls = arrival_batches([len(item) for item in encoded], batch_size, split_tokens)
    return [pad_batch([encoded[i] for i in call], pad_id) for call in calls]


def batch_seconds(model: Any, batches: Sequence[Any], threshold: float, clock: Callable[[], float]) -> list[float]:
    """The seconds of each of `batches` at `threshold`, one pass."""
    times = []
    for batch in batches:
        started = clock()
        _answers(model, [batch], threshold)
        times.append(clock() - started)
    return times


def batch1_inputs(encoded: Sequence[Any], pad_id: int, timing: Timing) -> list[Any]:
    """The first `timing.batch1_rows` texts, each a batch of one."""
    from model.tokenization import pad_batch

    return [pad_batch([item], pad_id) for item in encoded[: timing.batch1_rows]]


def batch1_pass_ms(model: Any, singles: Sequence[Any], threshold: float, clock: Callable[[], float]) -> float:
    """Batch-1 mean ms at `threshold` over `singles` (batches of one), one pass."""
    started = clock()
    _answers(model, singles, threshold)
    return (clock() - started) / max(1, len(singles)) * 1000


def batch1_text_ms(model: Any, singles: Sequence[Any], threshold: float, clock: Callable[[], float]) -> list[float]:
    """The ms of each of `singles` (batches of one) at `threshold`, one pass."""
    return [seconds * 1000 for seconds in batch_seconds(model, singles, threshold, clock)]


def settle_close_call(
    measurements: Sequence[Measurement],
    time_one: Callable[[str, int], Sequence[float]],
    texts: int,
    batched: bool = False,
    rounds: int | None = None,
    ratio: float | None = None,
    fit: Callable[[Measurement, Measurement, int], int] | None = None,
) -> tuple[Measurement, Measurement] | None:
    """When the two fastest eligible candidates are within `ratio` (default `CLOSE_CALL`): time them again side
    by side, `rounds` (default `CLOSE_CALL_ROUNDS`) passes each in alternating order, and keep each part's fastest
    pass. `time_one(key, n)` is one pass over the close call's first `n` of `texts` texts: alone (`batched`
    False) the ms of each text, and a candidate's batch-1 ms becomes the mean over texts of each text's fastest
    pass; in batches the seconds of each batch, and a candidate's texts/s becomes `n` / the sum of each batch's
    fastest pass. `fit(first, second, texts)` says how many of the texts the time left allows (fewer: a shorter
    close call; 0: none). The two, fastest first before the retiming; None when there was no close call, or no
    time for it."""
    ratio = CLOSE_CALL if ratio is None else ratio
    rounds = CLOSE_CALL_ROUNDS if rounds is None else rounds

    def cost(m: Measurement) -> float:  # lower is faster: ms alone, or seconds per text in batches
        value = m.batched_per_s if batched else m.batch1_ms
        return (1 / value if batched else value) if value else float("inf")

    ranked = sorted((m for m in measurements if m.eligible and cost(m) < float("inf")), key=cost)
    if len(ranked) < 2 or cost(ranked[1]) > cost(ranked[0]) * ratio:
        return None
    pair = ranked[:2]
    count = texts if fit is None else min(texts, fit(pair[0], pair[1], texts))
    if count <= 0:
        return None
    fastest: dict[str, list[float]] = {}
    for round_number in range(rounds):
        for measurement in pair if round_number % 2 == 0 else pair[::-1]:
            times = list(time_one(measurement.candidate, count))
            best = fastest.get(measurement.candidate, times)
            fastest[measurement.candidate] = [min(a, b) for a, b in zip(best, times, strict=True)]
    for measurement in pair:
        if batched:
            measurement.batched_per_s = count / sum(fastest[measurement.candidate])
            measurement.batched_retimed = True
        else:
            measurement.batch1_ms = statistics.fmean(fastest[measurement.candidate])
            measurement.batch1_retimed = True
    return pair[0], pair[1]


def close_call_texts(
    first: Measurement, second: Measurement, texts: int, batched: bool, left_s: float, budget_s: float, batch_size: int
) -> int:
    """How many of a close call's `texts` fit in the `left_s` seconds left of a tune's `budget_s`: its passes (a
    warm-up and the timed rounds of each, by the sequential figures, plus half again for loading), in whole
    batches of `batch_size` in batches; 0 (logged) below the shortest close call worth timing
    (`CLOSE_CALL_MIN_TEXTS` alone, `CLOSE_CALL_MIN_BATCHES` in batches)."""
    per_text = sum(1 / (m.batched_per_s or 1) if batched else (m.batch1_ms or 0) / 1000 for m in (first, second))
    seconds_per_text = 1.5 * (CLOSE_CALL_ROUNDS + 1) * per_text
    count = min(texts, int(max(0.0, left_s) / seconds_per_text) if seconds_per_text > 0 else texts)
    if batched and count < texts:
        count -= count % batch_size
    least = min(texts, CLOSE_CALL_MIN_BATCHES * batch_size if batched else CLOSE_CALL_MIN_TEXTS)
    kind = "in batches" if batched else "at batch 1"
    if count < least:
        logger.info(
            "tune: %s and %s are within %.0f%% %s, but timing them again (about %.0f s for %d texts) would overrun"
            " the %.0f s budget; the sequential figures stand",
            first.candidate, second.candidate, (CLOSE_CALL - 1) * 100, kind, seconds_per_text * least, least,
            budget_s,
        )  # fmt: skip
        return 0
    if count < texts:
        logger.info(
            "tune: %s and %s are within %.0f%% %s; the time left in the %.0f s budget allows timing them again on"
            " %d of %d texts",
            first.candidate, second.candidate, (CLOSE_CALL - 1) * 100, kind, budget_s, count, texts,
        )  # fmt: skip
    return count


def judge(measurement: Measurement, reference_accuracy: float | None, has_answers: bool) -> Measurement:
    """Eligibility (module docstring): agreement with fp32 at balanced, and accuracy vs fp32 full depth."""
    if measurement.batch1_ms is None:
        return measurement
    candidate = Candidate.parse(measurement.candidate)
    if not has_answers:
        measurement.eligible = candidate.precision == "fp32"
        measurement.reason = (
            "fp32: the model's own answers" if measurement.eligible else "no tune sample to check a lower precision"
        )
        return measurement
    agreement = measurement.balanced_agreement
    if agreement is None or agreement < MIN_AGREEMENT:
        measurement.reason = f"agreement with fp32 at balanced {_percent(agreement)} < {MIN_AGREEMENT:.1%}"
        return measurement
    if reference_accuracy is not None and measurement.balanced_accuracy is not None:
        drop = reference_accuracy - measurement.balanced_accuracy
        if drop > MAX_ACCURACY_DROP + 1e-12:
            measurement.reason = f"balanced accuracy {drop * 100:.2f} points below fp32 full depth (max 0.5)"
            return measurement
    measurement.eligible = True
    measurement.reason = f"agreement {_percent(agreement)}"
    return measurement


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def choose(measurements: Sequence[Measurement], objective: str = "mixed") -> Measurement | None:
    """The fastest eligible candidate: by batch-1 latency, by batched throughput, or (`mixed`) by the mean of
    both relative to the best eligible value of each. (`split` chooses two: `choose_split`.)"""
    if objective not in OBJECTIVES or objective == "split":
        raise TuneError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
    eligible = [m for m in measurements if m.eligible and m.batch1_ms and m.batched_per_s]
    if not eligible:
        return None
    fastest_single = min(m.batch1_ms for m in eligible if m.batch1_ms)
    fastest_batched = max(m.batched_per_s for m in eligible if m.batched_per_s)

    def cost(m: Measurement) -> float:
        assert m.batch1_ms and m.batched_per_s
        single, batched = m.batch1_ms / fastest_single, fastest_batched / m.batched_per_s
        return {"latency": single, "throughput": batched, "mixed": (single + batched) / 2}[objective]

    return min(eligible, key=cost)


def choose_split(measurements: Sequence[Measurement]) -> tuple[Measurement, Measurement] | None:
    """The fastest eligible candidate at batch 1 and the fastest eligible one in batches (maybe the same). Another
    runtime than the batch-1 choice serves batches only when both were timed side by side in batches, or when it
    is ahead by more than `SPLIT_MARGIN` in batches (one pass each is not more exact than that)."""
    single, batched = choose(measurements, "latency"), choose(measurements, "throughput")
    if single is None or batched is None:
        return None
    if batched is not single and not (single.batched_retimed and batched.batched_retimed):
        assert single.batched_per_s and batched.batched_per_s
        if batched.batched_per_s <= single.batched_per_s * SPLIT_MARGIN:
            return single, single
    return single, batched


# --- the cached choice ----------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """A tune's table, its choice, and what the choice depends on (`fingerprint`)."""

    fingerprint: dict[str, Any]
    objective: str
    choice: str | None  # the runtime that serves (with a split: batches of one)
    measurements: list[Measurement]
    skipped: dict[str, str] = field(default_factory=dict)
    batched_choice: str | None = None  # with a split: the runtime that serves batches of two or more
    sample: str = ""
    seconds: float = 0.0
    created: str = ""

    @property
    def chosen(self) -> Measurement | None:
        return next((m for m in self.measurements if m.candidate == self.choice), None)

    def reason(self) -> str:
        """One line: why this backend serves."""
        chosen = self.chosen
        if chosen is None:
            return "tuned: no candidate was eligible"
        measured = sum(1 for m in self.measurements if m.batch1_ms is not None)
        batch = self.fingerprint["batch_size"]
        head = f"tuned ({self.objective}): fastest eligible of {measured} measured on {self.fingerprint['cpu']}"
        batched = next((m for m in self.measurements if m.candidate == self.batched_choice), None)
        if batched is not None:
            return (
                f"{head}: batch 1 on {chosen.candidate} ({chosen.batch1_ms:.2f} ms), batches on "
                f"{batched.candidate} (batch {batch} {batched.batched_per_s:.0f} texts/s) at balanced"
            )
        every_size = ""
        if self.objective == "split":
            every_size = " for every batch size (fastest alone and in batches)"
            ahead = choose(self.measurements, "throughput") or chosen  # the fastest eligible in batches
            if ahead is not chosen and chosen.batched_per_s:
                every_size = (
                    f" for every batch size (fastest alone; {ahead.candidate}'s {ahead.batched_per_s:.0f} texts/s"
                    f" in batches, one pass each, is within {(SPLIT_MARGIN - 1) * 100:.0f}%)"
                )
        return (
            f"{head}: {chosen.candidate}{every_size}, batch 1 {chosen.batch1_ms:.2f} ms, batch {batch} "
            f"{chosen.batched_per_s:.0f} texts/s at balanced ({chosen.reason})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> TuneResult:
        measurements = [Measurement(**m) for m in data.pop("measurements")]
        return TuneResult(measurements=measurements, **data)


def code_digest(package: Path | None = None) -> str:
    """A digest of the Python sources of `package` (default: this `model` package, whose graphs and loops are
    what a tune times): a changed loop or export tunes again, though deebert's version number stays the same
    between releases."""
    package = Path(__file__).parent if package is None else package
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def runtime_versions() -> dict[str, str]:
    """The versions a tune's timings depend on: the runtimes', and deebert's own (its version and its code)."""
    from importlib import metadata

    try:
        own = metadata.version("deebert")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        own = "not installed"
    versions: dict[str, str] = {"deebert": own, "deebert_code": code_digest(), "torch": str(torch.__version__)}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = str(__import__(name).__version__)
        except ImportError:
            versions[name] = "absent"
    return versions


def fingerprint(
    checkpoint_digest: str,
    threads: int | None,
    batch_size: int,
    flags: Sequence[str] | None = None,
    split_tokens: int | None = None,
) -> dict[str, Any]:
    """What a tuned choice holds for: this CPU, these weights, these runtimes, these settings."""
    from model.onnx_export import GRAPH_FORMAT

    name, own_flags = cpu_description()
    cpu_flags = own_flags if flags is None else list(flags)
    from model.openvino_backend import preloaded_allocator

    return {
        "format": TUNE_FORMAT,
        "cpu": name,
        # Timings differ by allocator: a tune holds for one kind.
        "allocator": preloaded_allocator() or "system",
        "cpu_flags_digest": hashlib.sha256(" ".join(sorted(cpu_flags)).encode()).hexdigest()[:16],
        "cpus": os.cpu_count(),
        "checkpoint_digest": checkpoint_digest,
        "versions": runtime_versions(),
        "graph_format": GRAPH_FORMAT,
        "threads": threads,
        "batch_size": batch_size,
        "batch_split_tokens": split_tokens,
    }


def cache_path(cache_dir: Path, print_: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / "tune" / f"{key}.json"


def cached_result(cache_dir: Path, print_: dict[str, Any]) -> TuneResult | None:
    """The tune stored for exactly this fingerprint; None when there is none (or it is unreadable)."""
    path = cache_path(cache_dir, print_)
    if not path.is_file():
        return None
    try:
        result = TuneResult.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        logger.warning("tune cache %s is unreadable (%s): ignored", path, err)
        return None
    return result if result.fingerprint == print_ else None


def store_result(cache_dir: Path, result: TuneResult) -> Path:
    path = cache_path(cache_dir, result.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    os.replace(staging, path)
    return path


# --- the tune -------------------------------------------------------------------------------------------


def run_tune(
    directory: Path,
    cache_dir: Path,
    threads: int | None = None,
    objective: str = "split",
    timing: Timing | None = None,
    budget_s: float | None = None,
    candidates: Sequence[Candidate] | None = None,
    progress: bool = False,
) -> TuneResult:
    """Measure every runnable candidate on the checkpoint in `directory`, choose, and store the result."""
    if objective not in OBJECTIVES:
        raise TuneError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
    from model.backends import quiet_torch_threads
    from model.checkpoint import load_model
    from model.onnx_export import model_digest
    from model.saving import expected_saving
    from model.tokenization import load_tokenizer, pad_batch, tokenize

    timing = timing or Timing()
    started = time.perf_counter()
    reference = load_model(directory).eval()
    runnable, skipped = available_candidates(has_int8_ranges=bool(reference.config.int8_ranges))
    if candidates is not None:
        runnable = [c for c in runnable if c in candidates]
    for key, why in skipped.items():
        logger.info("tune: %s not run: %s", key, why)
    if not runnable:
        raise TuneError("no candidate runtime can run here")
    tokenizer = load_tokenizer(directory)
    sample = TuneSample.read(directory)
    sample_name = f"{SAMPLE_FILE} ({len(sample)} rows)" if sample else "synthetic texts (no tune sample)"
    if sample is None:
        sample = synthetic_sample(tokenizer, reference.config.is_pair_task, size=timing.batched_rows)
    has_answers = bool(sample.full_depth_labels)
    encoded = tokenize(tokenizer, sample.texts, sample.text_pairs, reference.config.max_length)
    pad_id = int(tokenizer.pad_token_id or 0)
    batches = [pad_batch(encoded[i : i + 64], pad_id) for i in range(0, len(encoded), 64)]
    balanced_reference, _ = reference.config.resolve_threshold("balanced") if reference.config.presets else (0.0, None)
    torch_threads = threads or torch.get_num_threads()
    with torch.inference_mode():
        reference_balanced = _answers(reference, batches, balanced_reference)
    reference_accuracy = None
    if has_answers and sample.labels is not None:
        reference_accuracy = float(np.mean(np.array(sample.full_depth_labels) == np.array(sample.labels)))
    print_ = fingerprint(model_digest(reference), threads, timing.batch_size, split_tokens=timing.split_tokens)
    measurements: list[Measurement] = []
    iterator: Any = runnable
    if progress:
        from tqdm import tqdm

        iterator = tqdm(runnable, desc="tune", unit="runtime")
    for candidate in iterator:
        if budget_s is not None and time.perf_counter() - started > budget_s:
            measurements.append(
                Measurement(candidate.key, reason=f"not measured: the {budget_s:.0f} s budget was spent")
            )
            continue
        candidate_started = time.perf_counter()
        try:
            torch.set_num_threads(torch_threads)
            served = load_candidate(directory, candidate, cache_dir, threads, fp32_model=reference)
            if candidate.backend == "torch":
                torch.set_num_threads(torch_threads)
            else:
                quiet_torch_threads()
            threshold, _ = served.config.resolve_threshold("balanced") if served.config.presets else (0.0, None)
            with torch.inference_mode():
                batch1_ms, batched_per_s = time_candidate(served, encoded, pad_id, threshold, timing)
                measurement = Measurement(candidate.key, batch1_ms, batched_per_s, threshold)
                if has_answers:
                    balanced, layers = _answers_and_layers(served, batches, threshold)
                    measurement.balanced_agreement = _agreement(balanced, reference_balanced)
                    if timing.full_depth_agreement:
                        full = _answers(served, batches, 0.0)
                        measurement.full_depth_agreement = _agreement(full, sample.full_depth_labels)
                    measurement.expected_saving = expected_saving(layers, served.num_layers)
                    if sample.labels is not None:
                        measurement.balanced_accuracy = _agreement(balanced, sample.labels)
        except Exception as err:  # a runtime that fails here is reported, not fatal
            logger.warning("tune: %s failed: %s", candidate.key, err)
            measurement = Measurement(candidate.key, reason=f"failed: {type(err).__name__}: {err}"[:300])
        measurement.seconds = round(time.perf_counter() - candidate_started, 1)
        measurements.append(judge(measurement, reference_accuracy, has_answers))
    if budget_s is None or time.perf_counter() - started <= budget_s:
        loaded: dict[str, tuple[Any, float]] = {}
        singles = batch1_inputs(encoded, pad_id, replace(timing, batch1_rows=max(timing.batch1_rows, CLOSE_CALL_TEXTS)))
        close_rows = min(len(encoded), CLOSE_CALL_BATCHED_TEXTS)
        close_batches: dict[tuple[int, int], list[Any]] = {}  # by split setting and texts
        warmed: set[tuple[str, bool]] = set()
        fitted: dict[bool, int] = {}  # texts of each close call, alone and in batches

        def time_one(key: str, texts: int, batched: bool) -> list[float]:
            """One pass of candidate `key` over the first `texts` texts: alone, the ms of each text; in batches,
            the seconds of each batch. Loaded again on first use and warmed by one untimed pass of the kind on
            first use of the kind."""
            candidate = Candidate.parse(key)
            torch.set_num_threads(torch_threads)
            if key not in loaded:
                served = load_candidate(directory, candidate, cache_dir, threads, fp32_model=reference)
                threshold, _ = served.config.resolve_threshold("balanced") if served.config.presets else (0.0, None)
                loaded[key] = served, threshold
            if candidate.backend != "torch":
                quiet_torch_threads()
            served, threshold = loaded[key]
            with torch.inference_mode():
                split = candidate_split_tokens(served, timing.split_tokens)
                if batched and (split, texts) not in close_batches:
                    close_batches[split, texts] = batched_inputs(encoded[:texts], pad_id, timing.batch_size, split)
                calls = close_batches[split, texts] if batched else singles[:texts]
                if (key, batched) not in warmed:
                    warmed.add((key, batched))
                    _answers(served, calls, threshold)
                if batched:
                    return batch_seconds(served, calls, threshold, timing.clock)
                return batch1_text_ms(served, calls, threshold, timing.clock)

        def fit(first: Measurement, second: Measurement, texts: int, batched: bool) -> int:
            if budget_s is None:
                return texts
            left = budget_s - (time.perf_counter() - started)
            fitted[batched] = close_call_texts(first, second, texts, batched, left, budget_s, timing.batch_size)
            return fitted[batched]

        for batched in (False, True):
            texts = close_rows if batched else len(singles)
            try:
                close_call = settle_close_call(
                    measurements,
                    partial(time_one, batched=batched),
                    texts,
                    batched=batched,
                    fit=partial(fit, batched=batched),
                )
            except Exception as err:  # the sequential figures stand
                logger.warning("tune: retiming a close call failed: %s", err)
                close_call = None
            if close_call is None:
                continue
            first, second = close_call
            if batched:
                logger.info(
                    "tune: %s and %s were within %.0f%% in batches; side by side (%d texts in batches of %d in"
                    " arrival order, split as the server would for each (%s), each call's fastest of %d passes): %.0f"
                    " and %.0f texts/s",
                    first.candidate, second.candidate, (CLOSE_CALL - 1) * 100, fitted.get(True, texts),
                    timing.batch_size, describe_split(timing.split_tokens), CLOSE_CALL_ROUNDS, first.batched_per_s,
                    second.batched_per_s,
                )  # fmt: skip
            else:
                logger.info(
                    "tune: %s and %s were within %.0f%% at batch 1; side by side (%d texts, each text's fastest of"
                    " %d passes): %.2f and %.2f ms",
                    first.candidate, second.candidate, (CLOSE_CALL - 1) * 100, fitted.get(False, texts),
                    CLOSE_CALL_ROUNDS,
                    first.batch1_ms, second.batch1_ms,
                )  # fmt: skip
    torch.set_num_threads(torch_threads)
    batched_choice = None
    if objective == "split":
        pair = choose_split(measurements)
        chosen = pair[0] if pair else None
        if pair and pair[1].candidate != pair[0].candidate:
            batched_choice = pair[1].candidate
    else:
        chosen = choose(measurements, objective)
    result = TuneResult(
        fingerprint=print_,
        objective=objective,
        choice=chosen.candidate if chosen else None,
        batched_choice=batched_choice,
        measurements=measurements,
        skipped=skipped,
        sample=sample_name,
        seconds=round(time.perf_counter() - started, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    store_result(cache_dir, result)
    return result


def _agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.mean(np.array(a) == np.array(b))) if len(a) else 0.0


def table_rows(result: TuneResult) -> list[list[str]]:
    """The tune's table for a terminal or a log: one row per candidate, the chosen one marked, times from a
    close call's side-by-side retiming (other texts than the rest's) marked as such."""
    rows = []
    for m in result.measurements:
        rows.append(
            [
                _mark(result, m.candidate) + m.candidate,
                _timed(m.batch1_ms, ".2f", m.batch1_retimed),
                _timed(m.batched_per_s, ".0f", m.batched_retimed),
                _percent(m.balanced_agreement) if m.balanced_agreement is not None else "-",
                _percent(m.balanced_accuracy) if m.balanced_accuracy is not None else "-",
                _percent(m.expected_saving) if m.expected_saving is not None else "-",
                "yes" if m.eligible else "no",
                m.reason,
            ]
        )
    for key, why in result.skipped.items():
        rows.append([f"  {key}", "-", "-", "-", "-", "-", "no", f"not run: {why}"])
    return rows


def _timed(value: float | None, spec: str, retimed: bool) -> str:
    return "-" if value is None else format(value, spec) + (" (side by side)" if retimed else "")


def _mark(result: TuneResult, candidate: str) -> str:
    """`* ` for the runtime that serves; with a split `1 ` (batches of one) and `B ` (batches)."""
    if result.batched_choice is None:
        return "* " if candidate == result.choice else "  "
    return "1 " if candidate == result.choice else "B " if candidate == result.batched_choice else "  "


TABLE_HEADER = ["runtime", "batch-1 ms", "batched texts/s", "agreement", "accuracy", "saving", "eligible", "why"]


# --- `--backend auto` -----------------------------------------------------------------------------------

# The tune at a server's first start: fewer texts and rounds, so that it ends within its budget.
STARTUP_TIMING = Timing(batch1_rows=40, batched_rows=160, rounds=1, full_depth_agreement=False)


def default_candidate() -> Candidate:
    """What `auto` serves without a tuned choice: ONNX Runtime fp32 where installed, else torch fp32."""
    from model.onnx_backend import onnxruntime_available

    return Candidate("onnxruntime", "fp32") if onnxruntime_available() else Candidate("torch", "fp32")


def resolve_auto(
    directory: Path,
    checkpoint_digest: str,
    cache_dir: Path,
    threads: int | None,
    batch_size: int,
    budget_s: float,
    split_tokens: int | None = None,
) -> tuple[Candidate, Candidate | None, str]:
    """The runtime `--backend auto` serves on this CPU (and, with a split, the one for batches), and why: the
    cached tune for this fingerprint; else a tune bounded by `budget_s` (0: none, the default candidate with a
    line saying how to tune)."""
    print_ = fingerprint(checkpoint_digest, threads, batch_size, split_tokens=split_tokens)
    cached = cached_result(cache_dir, print_)
    if cached is not None and cached.choice:
        where = cache_path(cache_dir, print_)
        logger.info("backend auto: %s, from the tune of %s (%s)", _served(cached), cached.created, where)
        return (*_candidates(cached), cached.reason())
    fallback = default_candidate()
    if budget_s <= 0:
        logger.info(
            "backend auto: no tune for this CPU and checkpoint; serving %s. Measure every runtime with "
            "`deebert tune --checkpoint %s` (or set DEEBERT_TUNE_BUDGET_S to tune at start)",
            fallback.key,
            directory,
        )
        return fallback, None, f"default ({fallback.key}): not tuned on this machine"
    logger.info("backend auto: no tune for this CPU and checkpoint; a short tune (at most ~%.0f s) first", budget_s)
    timing = replace(STARTUP_TIMING, batch_size=batch_size, split_tokens=split_tokens)
    result = run_tune(directory, cache_dir, threads, "split", timing, budget_s=budget_s)
    logger.info("tune (%s, %.0f s):", result.sample, result.seconds)
    for row in table_rows(result):
        logger.info("  %s", "; ".join(f"{name} {cell}" for name, cell in zip(TABLE_HEADER, row, strict=True)))
    if result.choice is None:
        return fallback, None, f"default ({fallback.key}): the tune found no eligible candidate"
    return (*_candidates(result), result.reason())


def _candidates(result: TuneResult) -> tuple[Candidate, Candidate | None]:
    assert result.choice is not None
    batched = Candidate.parse(result.batched_choice) if result.batched_choice else None
    return Candidate.parse(result.choice), batched


def _served(result: TuneResult) -> str:
    if result.batched_choice:
        return f"{result.choice} for batches of one, {result.batched_choice} for batches"
    return str(result.choice)


def load_candidate(
    directory: Path, candidate: Candidate, cache_dir: str | Path | None, threads: int | None, fp32_model: Any = None
) -> Any:
    """`candidate`'s runtime for the checkpoint in `directory`. A loaded fp32 model (`fp32_model`) serves every
    candidate that computes in or exports from fp32, instead of loading the checkpoint again."""
    from model.backends import load_backend
    from model.checkpoint import load_model

    if fp32_model is not None and candidate.dtype == torch.float32:
        model = fp32_model
    else:
        model = load_model(directory, dtype=candidate.dtype).eval()
    return load_backend(model, candidate.backend, candidate.backend_precision, cache_dir, threads)


def load_served(
    directory: Path,
    single: Candidate,
    batched: Candidate | None,
    cache_dir: str | Path | None,
    threads: int | None,
    fp32_model: Any = None,
) -> Any:
    """The model `auto` serves: `single`'s runtime, or with a split `single` for batches of one and `batched`
    for the rest (`SplitExitModel`)."""
    from model.backends import SplitExitModel

    torch_threads = threads or torch.get_num_threads()
    served = load_candidate(directory, single, cache_dir, threads, fp32_model)
    if batched is None or batched == single:
        return served
    split = SplitExitModel(served, load_candidate(directory, batched, cache_dir, threads, fp32_model))
    if "torch" in (single.backend, batched.backend):
        # Loading a CPU runtime leaves torch one thread (`quiet_torch_threads`); a torch half computes with all
        # of them, as the tune measured it.
        torch.set_num_threads(torch_threads)
    return split


def load_auto(
    directory: Path,
    cache_dir: str | Path | None,
    threads: int | None,
    batch_size: int,
    budget_s: float,
    checkpoint: Any = None,
    split_tokens: int | None = None,
) -> tuple[Any, str, str]:
    """What `--backend auto` serves on this CPU (`resolve_auto`, then `load_served`), loaded; the candidate
    key(s) it serves (`single+batched` for a split) and why. `checkpoint`: the fp32 model, if already loaded."""
    from model.checkpoint import load_model
    from model.onnx_backend import default_cache_dir
    from model.onnx_export import model_digest

    checkpoint = load_model(directory).eval() if checkpoint is None else checkpoint
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    single, batched, reason = resolve_auto(
        directory, model_digest(checkpoint), cache, threads, batch_size, budget_s, split_tokens
    )
    served = single.key if batched is None else f"{single.key}+{batched.key}"
    return load_served(directory, single, batched, cache_dir, threads, checkpoint), served, reason
