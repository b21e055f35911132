"""Evaluation: per-layer accuracy, threshold sweep, oracle and batch-1 timing, as one report (a dict).

Accuracy and expected saving come from every off-ramp's output computed once per sample and the shared
exit rule (`model.exit_rule`); measured saving comes from timing the real exit loop at batch 1 against a
plain full forward, interleaved sample by sample so machine noise hits both alike.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from model import exit_rule
from model.backends import ExitModel
from model.calibrate import calibrate
from model.device import describe_device, synchronize
from model.saving import saving_from_totals
from model.sweep import Targets, binary_f1, correct, oracle, simulate
from model.tokenization import Encoded, groups_by_length, pad_batch


@torch.inference_mode()
def all_layer_outputs(
    model: ExitModel, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 64, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every off-ramp's probabilities [layers, samples, labels] and entropies [layers, samples], on the CPU."""
    model.eval()
    device = model.device
    num_layers, num_labels = model.num_layers, model.config.num_labels
    probabilities = torch.empty(num_layers, len(encoded), num_labels)
    entropies = torch.empty(num_layers, len(encoded))
    for rows in tqdm(groups_by_length(encoded, batch_size), desc="all off-ramps", disable=not progress):
        batch = pad_batch([encoded[i] for i in rows], pad_id).to(device)
        logits = model.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        layer_probabilities, layer_entropy = model.config.criterion.outputs(logits)
        probabilities[:, rows] = layer_probabilities.cpu()
        entropies[:, rows] = layer_entropy.cpu()
    return probabilities, entropies


def per_layer_accuracy(probabilities: torch.Tensor, labels: Targets) -> list[float]:
    """Accuracy when every sample is forced to leave at layer i (paper Fig. 4); multi-label: subset accuracy."""
    return [float(v) for v in correct(probabilities, torch.tensor(labels)).float().mean(dim=1)]


def per_layer_f1(probabilities: torch.Tensor, labels: Targets) -> list[float | None]:
    """F1 of label 1 when every sample leaves at layer i (two-class single-label tasks)."""
    target = torch.tensor(labels)
    if target.dim() == 2:
        return [None] * probabilities.shape[0]
    return [binary_f1(probabilities[i].argmax(-1), target) for i in range(probabilities.shape[0])]


@torch.inference_mode()
def time_batch1(
    model: ExitModel,
    encoded: Sequence[Encoded],
    pad_id: int,
    thresholds: Sequence[float],
    max_samples: int,
    seed: int = 0,
    progress: bool = True,
    criterion: exit_rule.ExitCriterion | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Batch-1 latency of the plain full forward and of the exit loop at each threshold.

    Sample by sample, every variant runs `repeats` times on the same input, interleaved in a new random order
    each round, so slow spells of the machine and cache effects cost every variant alike; a sample's time for
    a variant is the fastest of its runs (as `timeit` advises: slower runs measure interruptions, not the
    code), and a variant's latency is the mean of those over the samples. On CUDA each run ends when the
    device has finished its queued kernels, so the plain forward's asynchronous launches are not flattered.
    """
    model.eval()
    device = model.device
    rule = criterion or model.config.criterion
    n = model.num_layers
    repeats = max(1, repeats)
    # Off-ramps a variant evaluates beyond the plain forward's final classifier: a row that may leave early
    # runs the off-ramp of every layer it reaches; at full depth the loop skips the intermediate ones.
    exits_early = [rule.can_exit_early(torch.tensor([t]), n) for t in thresholds]
    indices = list(range(len(encoded)))
    random.Random(seed).shuffle(indices)
    indices = indices[:max_samples]
    batches = [pad_batch([encoded[i]], pad_id).to(device) for i in indices]
    for batch in batches[:10]:  # warm-up: allocator, kernels, lazy init
        model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        for threshold in thresholds:
            model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold], criterion=criterion)
    plain_ns = 0
    exit_ns = [0] * len(thresholds)
    layers_run = [0] * len(thresholds)
    extra_off_ramps = [0] * len(thresholds)
    variants = [-1, *range(len(thresholds))]  # -1: the plain full forward
    order = random.Random(seed + 1)
    # As the server does once loaded: long-lived objects out of the collector's sight, so a full collection
    # over the model's objects does not land on whichever variant happens to be allocating at that moment.
    gc.collect()
    gc.freeze()
    try:
        for batch in tqdm(batches, desc="batch-1 timing", disable=not progress):
            fastest = dict.fromkeys(variants, 1 << 62)
            exit_layer = [0] * len(thresholds)
            for _ in range(repeats):
                # A fresh random order every round: no variant always runs right after another (cache, clocks).
                order.shuffle(variants)
                for k in variants:
                    started = time.perf_counter_ns()
                    if k < 0:
                        model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
                    else:
                        exit_layer[k] = model.infer(
                            batch.input_ids,
                            batch.attention_mask,
                            batch.token_type_ids,
                            [thresholds[k]],
                            criterion=criterion,
                        ).exit_layer[0]
                    synchronize(device)
                    fastest[k] = min(fastest[k], time.perf_counter_ns() - started)
            plain_ns += fastest[-1]
            for k in range(len(thresholds)):
                exit_ns[k] += fastest[k]
                layers_run[k] += exit_layer[k]
                extra_off_ramps[k] += exit_layer[k] - 1 if exits_early[k] else 0
    finally:
        gc.unfreeze()
    count = max(1, len(batches))
    return {
        "samples": len(batches),
        "repeats": repeats,
        "device": describe_device(device),
        "dtype": model.precision,
        "backend": model.backend,
        "plain_ms": plain_ns / count / 1e6,
        "exit_ms": [t / count / 1e6 for t in exit_ns],
        "measured_saving": [1.0 - t / plain_ns for t in exit_ns] if plain_ns else [0.0] * len(thresholds),
        "expected_saving_on_timed": [saving_from_totals(r, n * count) or 0.0 for r in layers_run],
        "extra_off_ramps_per_sample": [r / count for r in extra_off_ramps],
    }


def fit_exit_costs(
    plain_ms: float, exit_ms: Sequence[float], expected: Sequence[float], extra_off_ramps: Sequence[float]
) -> tuple[float, float] | None:
    """Why measured saving trails expected, from the sweep's own timings: the least-squares fit of

        exit_ms − plain_ms · (1 − expected) = off_ramp_ms · extra_off_ramps + unsaved · plain_ms · expected

    The left side is what the loop took beyond a plain forward shrunk by the expected saving. Two things
    make it positive: every off-ramp a sample passes beyond the final classifier (`extra_off_ramps` per
    sample) costs `off_ramp_ms`, and the share `unsaved` of a plain forward spent outside the encoder layers
    (embeddings, attention mask, the classifier) is paid however early a sample leaves, so that share of the
    expected saving never comes. (off_ramp_ms, unsaved), or None when the sweep cannot tell them apart.
    """
    xs = list(extra_off_ramps)
    zs = [plain_ms * e for e in expected]
    ys = [t - plain_ms * (1.0 - e) for t, e in zip(exit_ms, expected, strict=True)]
    xx = sum(x * x for x in xs)
    zz = sum(z * z for z in zs)
    xz = sum(x * z for x, z in zip(xs, zs, strict=True))
    determinant = xx * zz - xz * xz
    if determinant <= 1e-9 * max(xx * zz, 1e-30):
        return None
    xy = sum(x * y for x, y in zip(xs, ys, strict=True))
    zy = sum(z * y for z, y in zip(zs, ys, strict=True))
    return (zz * xy - xz * zy) / determinant, (xx * zy - xz * xy) / determinant


def _snap(threshold: float, known: Sequence[float], tolerance: float = 1e-6) -> float:
    """`threshold`, or the value in `known` it equals up to a relative `tolerance`."""
    for value in known:
        if abs(value - threshold) <= tolerance * max(1.0, abs(value)):
            return value
    return threshold


def evaluate(
    model: ExitModel,
    encoded: Sequence[Encoded],
    labels: Targets,
    pad_id: int,
    thresholds: Sequence[float] | None = None,
    timing_samples: int = 1000,
    progress: bool = True,
    criterion: exit_rule.ExitCriterion | None = None,
    timing_repeats: int = 3,
) -> dict[str, Any]:
    """The evaluation report (`reports.evaluation` writes its files and its terminal summary).

    `criterion` (default: the checkpoint's) picks the exit rule the sweep runs; the checkpoint's presets
    are reported only when they belong to that rule.
    """
    config = model.config
    rule = criterion or config.criterion
    presets = config.presets if rule.name == config.exit_criterion else []
    probabilities, entropies = all_layer_outputs(model, encoded, pad_id, progress=progress)
    on_this_data = calibrate(probabilities, entropies, labels, criterion=rule)
    grid = list(thresholds) if thresholds is not None else rule.default_grid(config.num_labels, model.num_layers)
    # Full depth is the reference; the presets' own thresholds and the tolerance points on this data are
    # timed like any grid point.
    # A tolerance point that is a preset's threshold but for float rounding (the presets were calibrated in
    # an earlier run) is the preset's: one row per threshold in the sweep.
    preset_thresholds = [p.threshold for p in presets]
    extra = preset_thresholds + [_snap(c.threshold, preset_thresholds) for c in on_this_data]
    grid = sorted({rule.full_depth, *grid, *extra}, key=rule.aggressiveness)
    points = simulate(probabilities, entropies, labels, grid, rule)
    timing = (
        time_batch1(
            model, encoded, pad_id, grid, timing_samples, progress=progress, criterion=rule, repeats=timing_repeats
        )
        if timing_samples
        else None
    )
    if timing is not None:
        for point, measured in zip(points, timing["measured_saving"], strict=True):
            point.measured_saving = measured
    preset_points = simulate(probabilities, entropies, labels, [p.threshold for p in presets], rule)
    per_layer = per_layer_accuracy(probabilities, labels)
    layer_f1 = per_layer_f1(probabilities, labels) if config.num_labels == 2 else None
    report: dict[str, Any] = {
        "model": config.name,
        "num_layers": model.num_layers,
        "num_samples": len(encoded),
        "labels": config.labels,
        "exit_criterion": rule.name,
        "full_accuracy": per_layer[-1],
        "per_layer_accuracy": per_layer,
        # F1 of label 1 (as GLUE scores MRPC), for two-class tasks.
        "full_f1": layer_f1[-1] if layer_f1 else None,
        "per_layer_f1": layer_f1,
        "sweep": [
            {
                "threshold": p.threshold,
                "accuracy": p.accuracy,
                "expected_saving": p.expected_saving,
                "measured_saving": p.measured_saving,
                "exit_counts": p.exit_counts,
                "f1": p.f1,
            }
            for p in points
        ],
        "oracle": oracle(probabilities, labels),
        # The presets' rule applied to this data itself: the best threshold within each accuracy tolerance,
        # chosen on the data it is scored on (an upper bound; the checkpoint's presets were chosen on dev).
        "calibrated_on_this_data": [
            {
                "name": c.name,
                "threshold": c.threshold,
                "max_accuracy_drop": c.max_accuracy_drop,
                "accuracy": c.accuracy,
                "expected_saving": c.expected_saving,
            }
            for c in on_this_data
        ],
        "presets": [
            {
                "name": preset.name,
                "threshold": preset.threshold,
                "accuracy": p.accuracy,
                "f1": p.f1,
                "expected_saving": p.expected_saving,
                "measured_saving": points[grid.index(preset.threshold)].measured_saving,
            }
            for preset, p in zip(presets, preset_points, strict=True)
        ],
    }
    if timing is not None:
        zero = grid.index(rule.full_depth)
        report["latency_ms"] = {
            "plain_full_forward": timing["plain_ms"],
            "exit_loop_threshold_0": timing["exit_ms"][zero],
            "exit_loop_overhead_at_threshold_0": timing["exit_ms"][zero] / timing["plain_ms"] - 1.0,
            "per_threshold": dict(zip([str(t) for t in grid], timing["exit_ms"], strict=True)),
        }
        report["timing"] = {
            "batch_size": 1,
            "samples": timing["samples"],
            "repeats": timing["repeats"],
            "method": "every variant run `repeats` times per sample, interleaved in a random order per round; "
            "the fastest run counts; mean over the samples; garbage collector frozen as in the server",
            "device": timing["device"],
            "dtype": timing["dtype"],
            "threads": torch.get_num_threads(),
            "expected_saving_on_timed_samples": timing["expected_saving_on_timed"],
            "measured_over_expected": [
                (m / e if e > 0 else None)
                for m, e in zip(timing["measured_saving"], timing["expected_saving_on_timed"], strict=True)
            ],
            "extra_off_ramps_per_sample": timing["extra_off_ramps_per_sample"],
        }
        fit = fit_exit_costs(
            timing["plain_ms"],
            timing["exit_ms"],
            timing["expected_saving_on_timed"],
            timing["extra_off_ramps_per_sample"],
        )
        if fit is not None:
            off_ramp_ms, unsaved = fit
            report["timing"]["exit_costs"] = {
                "off_ramp_ms": off_ramp_ms,
                "off_ramp_fraction_of_plain_forward": off_ramp_ms / timing["plain_ms"],
                "unsaved_fraction": unsaved,
                "fit": "exit_ms - plain_ms * (1 - expected_saving) = off_ramp_ms * extra_off_ramps_per_sample "
                "+ unsaved_fraction * plain_ms * expected_saving, least squares over the sweep; so "
                "measured / expected = 1 - unsaved_fraction - off_ramp_ms * extra_off_ramps_per_sample "
                "/ (plain_ms * expected_saving)",
            }
    return report
