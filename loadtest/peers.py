"""The peer benchmark (`deebert bench --parts peers`): deebert's exit loop against the plain runtimes a user
would serve the same model with, on the same sentences, in one run.

Variants (each in its own process, so one runtime's threads, allocator and caches never sit beside another's):
plain PyTorch fp32, plain ONNX Runtime fp32 (the BERT-fused graph), plain ONNX Runtime int8 (dynamic QInt8),
plain OpenVINO fp32 (the unfused ONNX graph, when openvino is installed); deebert on torch fp32 and on ONNX
Runtime fp32 and int8, each at threshold 0 and at `balanced`.

The driver starts every variant's worker, then interleaves: each round, for each chunk of the batch-1
sentences, every variant runs that chunk in a fresh random order; then every variant (again in random order)
runs the batch-32 pass over the whole data set (sorted by length, dynamic padding). Only one worker computes
at a time; the others wait on their pipe. A sentence's batch-1 time is the fastest of its rounds and a
variant's latency the mean (and median) of those; its throughput is the median over rounds of sentences per
second; accuracy comes from the batch-32 labels, and the batch-1 labels are compared with them (int8 answers
can depend on the batch they ran in). Times cover the model call and reading its answer (tokenizing is the
same for every variant and left out).

    python -m loadtest.peers --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.report import write_json
from loadtest.targets import target
from model.saving import expected_saving, time_weighted_saving
from reports.common import cpu_times, describe_machine, machine_description, markdown_table, percent, stolen_share

# deebert on the runtime `auto` chose against the best plain variant of the same run (issue 24).
RUNTIME_TARGETS = {
    "throughput_vs_best_plain": 1.5,  # balanced / the best plain sentences/s, batch 32 (at least)
    "batch1_vs_best_plain": 0.6,  # balanced / the best plain batch-1 mean ms (at most)
    "saving_realized": 0.85,  # balanced's batch-1 time saved vs threshold 0 on its runtime / expected saving
    "accuracy_drop_points": 0.5,  # balanced vs fp32 full depth (at most); also what makes a plain variant count
}
# deebert targets against the peers (issue 15), each a ratio measured in one run.
TARGETS = {
    "loop_at_zero_vs_plain": 1.05,  # ORT exit loop at threshold 0 / plain ORT fp32, batch 1 (at most)
    "balanced_vs_plain_batch1": 0.55,  # balanced on ORT fp32 / plain ORT fp32, batch 1 (at most)
    "balanced_saving_realized": 0.85,  # balanced's batch-1 time saved vs plain ORT fp32 / its expected saving
    "balanced_speedup_vs_torch": 4.0,  # plain PyTorch fp32 / balanced on ORT fp32, batch 1 (at least)
    "balanced_throughput_vs_plain": 1.6,  # balanced ORT fp32 / plain ORT fp32 sentences/s, batch 32
    "balanced_throughput_vs_int8": 1.15,  # balanced ORT fp32 / plain ORT int8 sentences/s, batch 32
    "accuracy_drop_points": 0.5,  # balanced vs fp32 full depth, dev accuracy points (at most)
    "int8_throughput_vs_plain": 2.0,  # stretch: int8 balanced / plain ORT fp32 sentences/s, batch 32
}


@dataclass(frozen=True)
class Variant:
    """One way to run the model: a runtime and precision, and either the plain forward or the exit loop."""

    key: str
    label: str
    runtime: str  # torch | onnxruntime | openvino | auto (what `deebert tune` chose here)
    precision: str  # fp32 | bf16 | int8 | default (OpenVINO's own choice) | auto
    threshold: str | None = None  # None: the plain full forward; else the exit loop at this threshold/preset


VARIANTS = (
    Variant("torch-plain", "plain PyTorch fp32", "torch", "fp32"),
    Variant("torch-bf16-plain", "plain PyTorch bf16", "torch", "bf16"),
    Variant("ort-plain", "plain ONNX Runtime fp32 (BERT-fused graph)", "onnxruntime", "fp32"),
    Variant("ort-int8-plain", "plain ONNX Runtime int8 (dynamic QInt8)", "onnxruntime", "int8"),
    Variant("openvino-plain", "plain OpenVINO fp32", "openvino", "fp32"),
    Variant("openvino-default-plain", "plain OpenVINO, its default precision", "openvino", "default"),
    Variant("torch-zero", "deebert, torch fp32, threshold 0", "torch", "fp32", "0"),
    Variant("torch-balanced", "deebert, torch fp32, balanced", "torch", "fp32", "balanced"),
    Variant("torch-bf16-balanced", "deebert, torch bf16, balanced", "torch", "bf16", "balanced"),
    Variant("ort-zero", "deebert, ONNX Runtime fp32, threshold 0", "onnxruntime", "fp32", "0"),
    Variant("ort-balanced", "deebert, ONNX Runtime fp32, balanced", "onnxruntime", "fp32", "balanced"),
    Variant("ort-int8-zero", "deebert, ONNX Runtime int8, threshold 0", "onnxruntime", "int8", "0"),
    Variant("ort-int8-balanced", "deebert, ONNX Runtime int8, balanced", "onnxruntime", "int8", "balanced"),
    Variant("openvino-balanced", "deebert, OpenVINO fp32, balanced", "openvino", "fp32", "balanced"),
    Variant("openvino-bf16-balanced", "deebert, OpenVINO bf16, balanced", "openvino", "bf16", "balanced"),
    Variant(
        "ort-int8-static-balanced",
        "deebert, ONNX Runtime static int8 (QDQ), balanced",
        "onnxruntime",
        "int8-static",
        "balanced",
    ),
    Variant(
        "openvino-int8-static-balanced",
        "deebert, OpenVINO static int8 (the same QDQ graph), balanced",
        "openvino",
        "int8-static",
        "balanced",
    ),
    Variant("auto-zero", "deebert, the runtime auto chose, threshold 0", "auto", "auto", "0"),
    Variant("auto-balanced", "deebert, the runtime auto chose, balanced", "auto", "auto", "balanced"),
)
# The plain variants: what a user would serve the model with instead (the bar the targets measure against).
PLAIN_KEYS = tuple(v.key for v in VARIANTS if v.threshold is None)
# deebert at balanced on each runtime `deebert tune` measures (variant key → tune candidate key).
BALANCED_CANDIDATES = {
    "torch-balanced": "torch-fp32",
    "torch-bf16-balanced": "torch-bf16",
    "ort-balanced": "onnxruntime-fp32",
    "ort-int8-balanced": "onnxruntime-int8",
    "openvino-balanced": "openvino-fp32",
    "openvino-bf16-balanced": "openvino-bf16",
    "ort-int8-static-balanced": "onnxruntime-int8-static",
    "openvino-int8-static-balanced": "openvino-int8-static",
}
VARIANT_KEYS = tuple(v.key for v in VARIANTS)


@dataclass
class PeerSettings:
    checkpoint: str = "weights/sst2-minilm-l6"
    data: str = "../shared/data/sst2/dev.tsv"
    threads: int = 2
    batch1_rows: int = 300
    chunk: int = 50
    batch_size: int = 32
    rounds: int = 3
    seed: int = 0
    cache_dir: str | None = None
    # `auto` without a tune cached for this machine tunes at load, as `deebert serve` does at first start
    # (its DEEBERT_TUNE_BUDGET_S default), before any timing; 0 measures the untuned default instead.
    tune_budget_s: float = 120.0
    # The server's DEEBERT_BATCH_SPLIT_TOKENS for the deebert variants' server-batches pass and `auto`'s tune key
    # (None: the server's default on the CPU).
    split_tokens: int | None = None
    variants: tuple[str, ...] = VARIANT_KEYS
    progress: bool = True


# --- the worker: one variant in its own process ----------------------------------------------------------


class _Runner:
    """A variant's model, the data set tokenized once, and its answer for a padded batch."""

    def __init__(self, variant: Variant, settings: PeerSettings) -> None:
        import torch

        from model.backends import load_backend
        from model.checkpoint import load_model
        from model.data import read_dataset
        from model.tokenization import load_tokenizer, tokenize

        torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        runtime, precision = variant.runtime, variant.precision
        self.chosen: str | None = None
        dtype = torch.bfloat16 if runtime == "torch" and precision == "bf16" else torch.float32
        model = load_model(settings.checkpoint, dtype=dtype).eval()
        tokenizer = load_tokenizer(settings.checkpoint)
        dataset = read_dataset(settings.data, label_names=model.config.labels)
        if dataset.labels is None:
            raise ValueError(f"{settings.data} has no labels")
        self.labels = dataset.labels
        self.encoded = tokenize(tokenizer, dataset.texts, dataset.text_pairs, model.config.max_length)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.num_layers = model.config.num_layers
        self.threshold: float | None = None
        self.predict: Callable[[Any], tuple[list[int], list[int]]]
        self.exit_model: Any = None  # deebert's model, for the refilled pass (`deebert classify`'s)
        self.precision_used = precision
        if runtime == "auto":
            from model.checkpoint import resolve_directory
            from model.tune import load_auto

            # What `--backend auto` serves here: the tune cached for this CPU, checkpoint, threads and batch size
            # (`deebert tune --threads T --max-batch-size B`), or, without one, a tune now within `tune_budget_s`,
            # as `deebert serve` runs at first start.
            served, self.chosen, self.chosen_reason = load_auto(
                resolve_directory(settings.checkpoint), settings.cache_dir, settings.threads, settings.batch_size,
                settings.tune_budget_s, model, split_tokens=settings.split_tokens,
            )  # fmt: skip
            assert variant.threshold is not None
            self.threshold, _ = served.config.resolve_threshold(variant.threshold)
            self.predict = self._exits(served, self.threshold)
            self.exit_model = served
        elif runtime == "openvino" and variant.threshold is None:
            self.predict = self._openvino(model, settings.threads, precision)
        else:
            backend_precision = "fp32" if runtime == "torch" else precision
            backend = load_backend(model, runtime, backend_precision, settings.cache_dir, settings.threads)
            if variant.threshold is None:
                self.predict = self._plain(backend)
            else:
                self.threshold, _ = backend.config.resolve_threshold(variant.threshold)
                self.predict = self._exits(backend, self.threshold)
                self.exit_model = backend
        self.load_s = time.perf_counter() - started

    def _plain(self, model: Any) -> Callable[[Any], tuple[list[int], list[int]]]:
        import torch

        n = self.num_layers

        def predict(batch: Any) -> tuple[list[int], list[int]]:
            with torch.inference_mode():
                logits = model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            return logits.argmax(dim=-1).tolist(), [n] * len(batch.input_ids)

        return predict

    def _exits(self, model: Any, threshold: float) -> Callable[[Any], tuple[list[int], list[int]]]:
        def predict(batch: Any) -> tuple[list[int], list[int]]:
            rows = batch.input_ids.shape[0]
            result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [threshold] * rows)
            return result.label, result.exit_layer

        return predict

    def _openvino(self, model: Any, threads: int, precision: str) -> Callable[[Any], tuple[list[int], list[int]]]:
        """Plain OpenVINO as a user would run it: the unfused ONNX graph compiled for the CPU, latency hint, our
        threads, and either f32 or OpenVINO's own default precision (bf16 where the CPU has it)."""
        import openvino

        from model.onnx_export import export_plain_unfused
        from model.openvino_backend import allow_under_preloaded_allocator

        allow_under_preloaded_allocator()  # before the first compile, should the peers run under jemalloc
        properties: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision == "fp32":
            properties["INFERENCE_PRECISION_HINT"] = "f32"
        core = openvino.Core()
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "plain.onnx"
            export_plain_unfused(model, path)
            compiled = core.compile_model(str(path), "CPU", properties)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type: its name, e.g. bf16
        self.precision_used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        request = compiled.create_infer_request()
        names = [port.get_any_name() for port in compiled.inputs]
        n = self.num_layers

        def predict(batch: Any) -> tuple[list[int], list[int]]:
            arrays = {
                "input_ids": batch.input_ids.numpy(),
                "attention_mask": batch.attention_mask.numpy(),
                "token_type_ids": batch.token_type_ids.numpy(),
            }
            logits = request.infer({name: arrays[name] for name in names})[compiled.outputs[0]]
            return logits.argmax(axis=-1).tolist(), [n] * len(arrays["input_ids"])

        return predict

    def batch1(self, rows: Sequence[int]) -> dict[str, Any]:
        from model.tokenization import pad_batch

        times, labels, layers = [], [], []
        for row in rows:
            batch = pad_batch([self.encoded[row]], self.pad_id)
            started = time.perf_counter_ns()
            label, layer = self.predict(batch)
            times.append(time.perf_counter_ns() - started)
            labels += label
            layers += layer
        return {"ns": times, "labels": labels, "layers": layers}

    def batched(self, batch_size: int) -> dict[str, Any]:
        """Every sentence, sorted by length, in batches padded to their longest member."""
        from model.tokenization import groups_by_length

        return self._timed_calls(groups_by_length(self.encoded, batch_size))

    def _timed_calls(self, calls: Sequence[Sequence[int]]) -> dict[str, Any]:
        """One pass over `calls` (rows of the data each), padded before the timing: its ns, and every row's label
        and exit layer in the data's order."""
        from model.tokenization import pad_batch

        padded = [pad_batch([self.encoded[i] for i in rows], self.pad_id) for rows in calls]
        labels = [0] * len(self.encoded)
        layers = [0] * len(self.encoded)
        started = time.perf_counter_ns()
        for rows, batch in zip(calls, padded, strict=True):
            label, layer = self.predict(batch)
            for position, row in enumerate(rows):
                labels[row], layers[row] = label[position], layer[position]
        return {"ns": time.perf_counter_ns() - started, "labels": labels, "layers": layers}

    def refilled(self, batch_size: int) -> dict[str, Any]:
        """Every sentence as `deebert classify` runs them: sorted by length, in batches of `batch_size` whose
        calls are refilled between layers (at most `batch_size` rows per call); the batches are padded before
        the timing, as `batched`'s are."""
        from model.bulk import length_sorted_batches

        assert self.exit_model is not None and self.threshold is not None
        order, batches = length_sorted_batches(self.encoded, self.threshold, self.pad_id, batch_size)
        started = time.perf_counter_ns()
        result = self.exit_model.infer_refilled(batches, batch_size)
        elapsed = time.perf_counter_ns() - started
        labels, layers = [0] * len(order), [0] * len(order)
        for position, row in enumerate(order):
            labels[row], layers[row] = result.label[position], result.exit_layer[position]
        return {"ns": elapsed, "labels": labels, "layers": layers}

    def server_batches(self, batch_size: int, split_setting: int | None) -> dict[str, Any]:
        """Every sentence in the data's order, as `deebert serve` runs texts arriving one per request: batches of
        `batch_size`, each split into calls over texts of like length as the server splits them for this model
        under DEEBERT_BATCH_SPLIT_TOKENS=`split_setting` (`candidate_split_tokens`, `arrival_batches`); the calls
        are padded before the timing. What `deebert tune` times in batches."""
        from model.tokenization import arrival_batches
        from model.tune import candidate_split_tokens

        split_tokens = candidate_split_tokens(self.exit_model, split_setting)
        return self._timed_calls(arrival_batches([len(item) for item in self.encoded], batch_size, split_tokens))

    def warm_up(self, batch_size: int, split_setting: int | None) -> None:
        self.batch1(range(min(10, len(self.encoded))))
        self.batched(batch_size)
        if self.exit_model is not None:
            self.refilled(batch_size)
            self.server_batches(batch_size, split_setting)


def worker(variant_key: str, settings: PeerSettings) -> None:
    """Serve one variant on stdin/stdout: one JSON command per line, one JSON answer per line."""
    import gc

    variant = next(v for v in VARIANTS if v.key == variant_key)
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    try:
        runner = _Runner(variant, settings)
        runner.warm_up(settings.batch_size, settings.split_tokens)
    except Exception as err:  # reported to the driver, which records the variant as not run
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return
    gc.collect()
    gc.freeze()
    hello: dict[str, Any] = {"ready": True, "load_s": runner.load_s, "threshold": runner.threshold}
    hello |= {"precision_used": runner.precision_used, "chosen": runner.chosen}
    hello |= {"refills": runner.exit_model is not None}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "batch1":
            answer = runner.batch1(command["rows"])
        elif command["op"] == "batched":
            answer = runner.batched(settings.batch_size)
        elif command["op"] == "refilled":
            answer = runner.refilled(settings.batch_size)
        elif command["op"] == "server_batches":
            answer = runner.server_batches(settings.batch_size, settings.split_tokens)
        else:
            break
        out.write(json.dumps(answer) + "\n")
        out.flush()


# --- the driver --------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, variant: Variant, settings: PeerSettings, log: Any) -> None:
        self.variant = variant
        argv = [
            sys.executable,
            "-m",
            "loadtest.peers",
            "--worker",
            variant.key,
            "--settings",
            json.dumps(asdict(settings)),
        ]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant.key} exited (code {self.process.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextlib.contextmanager
def _workers(settings: PeerSettings, log: Any) -> Iterator[tuple[list[_Worker], dict[str, str]]]:
    """Start the variants one after another (the first ONNX Runtime one exports the graphs into the cache);
    a variant that cannot start (openvino not installed) is reported, not fatal."""
    started: list[_Worker] = []
    skipped: dict[str, str] = {}
    try:
        for variant in VARIANTS:
            if variant.key not in settings.variants:
                continue
            print(f"peers: starting {variant.key}", file=sys.stderr)
            try:
                worker_process = _Worker(variant, settings, log)
            except RuntimeError as err:
                skipped[variant.key] = str(err)
                continue
            if "error" in worker_process.hello:
                skipped[variant.key] = worker_process.hello["error"]
                worker_process.close()
                continue
            started.append(worker_process)
        yield started, skipped
    finally:
        for worker_process in started:
            worker_process.close()


def _accuracy(labels: Sequence[int], gold: Sequence[int]) -> float:
    return sum(int(a == b) for a, b in zip(labels, gold, strict=True)) / max(1, len(gold))


def run_peers(settings: PeerSettings, log_path: Path | None = None) -> dict[str, Any]:
    """Every variant, interleaved, in one run; returns per-variant numbers, ratios and targets."""
    from model.checkpoint import resolve_directory
    from model.config import DeeBertConfig
    from model.data import read_dataset

    config = DeeBertConfig.load(resolve_directory(settings.checkpoint))
    gold = read_dataset(settings.data, label_names=config.labels).labels
    assert gold is not None
    rng = random.Random(settings.seed)
    sample = rng.sample(range(len(gold)), min(settings.batch1_rows, len(gold)))
    chunks = [sample[i : i + settings.chunk] for i in range(0, len(sample), settings.chunk)]
    machine = machine_description()
    began = time.time()
    began_cpu = cpu_times()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(
            open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
        )
        workers, skipped = stack.enter_context(_workers(settings, log))
        if not workers:
            raise RuntimeError(f"no variant started: {skipped}")
        per_round_ns: dict[str, list[int]] = {w.variant.key: [] for w in workers}
        per_sentence: dict[str, list[list[int]]] = {w.variant.key: [[] for _ in sample] for w in workers}
        batch1_labels: dict[str, list[int]] = {w.variant.key: [] for w in workers}
        batch1_layers: dict[str, list[int]] = {w.variant.key: [] for w in workers}
        batched_ns: dict[str, list[int]] = {w.variant.key: [] for w in workers}
        batched: dict[str, dict[str, Any]] = {}
        refilled_ns: dict[str, list[int]] = {}
        refilled: dict[str, dict[str, Any]] = {}
        server_ns: dict[str, list[int]] = {}
        server: dict[str, dict[str, Any]] = {}
        for round_number in range(settings.rounds):
            totals = dict.fromkeys(per_round_ns, 0)
            offset = 0
            for chunk in chunks:
                order = list(workers)
                rng.shuffle(order)
                for w in order:
                    answer = w.ask({"op": "batch1", "rows": chunk})
                    totals[w.variant.key] += sum(answer["ns"])
                    for position, ns in enumerate(answer["ns"]):
                        per_sentence[w.variant.key][offset + position].append(ns)
                    if round_number == 0:
                        batch1_labels[w.variant.key] += answer["labels"]
                        batch1_layers[w.variant.key] += answer["layers"]
                    time.sleep(0.02)  # let the last runtime's spinning threads go idle
                offset += len(chunk)
            for key, total in totals.items():
                per_round_ns[key].append(total)
            order = list(workers)
            rng.shuffle(order)
            for w in order:
                answer = w.ask({"op": "batched"})
                batched_ns[w.variant.key].append(answer["ns"])
                batched[w.variant.key] = answer
                time.sleep(0.02)
                if w.hello.get("refills"):
                    answer = w.ask({"op": "refilled"})
                    refilled_ns.setdefault(w.variant.key, []).append(answer["ns"])
                    refilled[w.variant.key] = answer
                    time.sleep(0.02)
                    answer = w.ask({"op": "server_batches"})
                    server_ns.setdefault(w.variant.key, []).append(answer["ns"])
                    server[w.variant.key] = answer
                    time.sleep(0.02)
            if settings.progress:
                print(f"peers: round {round_number + 1}/{settings.rounds} done", file=sys.stderr)
        hellos = {w.variant.key: w.hello for w in workers}
    gold_sample = [gold[i] for i in sample]
    variants: dict[str, Any] = {}
    for key, rounds_ns in per_round_ns.items():
        variant = next(v for v in VARIANTS if v.key == key)
        full = batched[key]
        fastest = [min(times) for times in per_sentence[key]]
        variants[key] = {
            **asdict(variant),
            "threshold_value": hellos[key].get("threshold"),
            "precision_used": hellos[key].get("precision_used"),
            "chosen": hellos[key].get("chosen"),
            "batched_labels": full["labels"],
            "load_s": hellos[key].get("load_s"),
            # A sentence's time is the fastest of its rounds (slower runs measure interruptions, as timeit
            # advises); the mean over sentences is the headline, as `deebert evaluate` reports it.
            "batch1_mean_ms": statistics.fmean(fastest) / 1e6,
            "batch1_p50_ms": statistics.median(fastest) / 1e6,
            "batch1_rounds_mean_ms": [ns / len(sample) / 1e6 for ns in rounds_ns],
            "batched_sentences_per_s": len(gold) / (statistics.median(batched_ns[key]) / 1e9),
            "batched_rounds_s": [ns / 1e9 for ns in batched_ns[key]],
            "accuracy": _accuracy(full["labels"], gold),
            "batch1_accuracy": _accuracy(batch1_labels[key], gold_sample),
            "batch1_vs_batched_label_agreement": _accuracy(batch1_labels[key], [full["labels"][i] for i in sample]),
            "expected_saving_batched": expected_saving(full["layers"], config.num_layers),
            "expected_saving_batch1": expected_saving(batch1_layers[key], config.num_layers),
            # Per batch-1 sentence (the sample's order): its fastest time and the layer it left at.
            "batch1_fastest_us": [round(ns / 1e3, 1) for ns in fastest],
            "batch1_layers": batch1_layers[key],
        }
        if key in refilled:  # the same sentences with calls refilled between layers (`deebert classify`)
            variants[key] |= {
                "refilled_sentences_per_s": len(gold) / (statistics.median(refilled_ns[key]) / 1e9),
                "refilled_rounds_s": [ns / 1e9 for ns in refilled_ns[key]],
                "refilled_accuracy": _accuracy(refilled[key]["labels"], gold),
                "refilled_vs_batched_label_agreement": _accuracy(refilled[key]["labels"], full["labels"]),
                "expected_saving_refilled": expected_saving(refilled[key]["layers"], config.num_layers),
            }
        if key in server:  # the same sentences in the server's batches (`deebert tune`'s batched figure)
            variants[key] |= {
                "server_sentences_per_s": len(gold) / (statistics.median(server_ns[key]) / 1e9),
                "server_rounds_s": [ns / 1e9 for ns in server_ns[key]],
                "server_vs_batched_label_agreement": _accuracy(server[key]["labels"], full["labels"]),
            }
    results: dict[str, Any] = {
        "command": command_line(settings),
        "settings": {**asdict(settings), "variants": list(settings.variants)},
        "machine": machine,
        "samples": {"batch1": len(sample), "batched": len(gold)},
        "elapsed_s": time.time() - began,
        # Variants interleave, so a neighbour's burst slows them alike; a high share still says the run was slow.
        "cpu_stolen": stolen_share(began_cpu, cpu_times()),
        "variants": variants,
        "skipped": skipped,
    }
    results["best_plain"] = best_plain(variants)
    results["fastest_eligible"] = fastest_eligible(variants)
    results["targets"] = runtime_targets(variants) + peer_targets(variants)
    results["exit_layer_profile"] = exit_layer_profile(variants, config.num_layers)
    return results


def command_line(settings: PeerSettings) -> str:
    words = ["python", "-m", "loadtest.peers", "--checkpoint", settings.checkpoint, "--data", settings.data]
    words += ["--threads", str(settings.threads), "--batch1-rows", str(settings.batch1_rows)]
    words += ["--rounds", str(settings.rounds), "--seed", str(settings.seed)]
    if settings.split_tokens is not None:
        words += ["--batch-split-tokens", str(settings.split_tokens)]
    if tuple(settings.variants) != VARIANT_KEYS:
        words += ["--variants", ",".join(settings.variants)]
    return " ".join(words)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _full_depth_accuracy(variants: dict[str, Any]) -> float | None:
    """fp32 full depth's accuracy: plain ONNX Runtime's, else plain PyTorch's (the same model, the same answers)."""
    for key in ("ort-plain", "torch-plain", "openvino-plain"):
        if key in variants:
            return float(variants[key]["accuracy"])
    return None


def best_plain(variants: dict[str, Any]) -> dict[str, Any]:
    """The fastest plain variant at batch 1 and in batches, among those within 0.5 point of fp32 full depth."""
    reference = _full_depth_accuracy(variants)
    limit = RUNTIME_TARGETS["accuracy_drop_points"] / 100
    plain = [
        key
        for key in PLAIN_KEYS
        if key in variants and (reference is None or variants[key]["accuracy"] >= reference - limit - 1e-12)
    ]
    if not plain:
        return {"batch1": None, "batched": None}
    return {
        "batch1": min(plain, key=lambda k: variants[k]["batch1_mean_ms"]),
        "batched": max(plain, key=lambda k: variants[k]["batched_sentences_per_s"]),
        "counted": plain,
    }


def fastest_eligible(variants: dict[str, Any]) -> str | None:
    """The tune candidate the peers run finds fastest by the tune's own rule: among deebert-at-balanced variants
    whose labels agree with fp32 at balanced on >= 99.5 % of the data and whose accuracy is within 0.5 point of
    fp32 full depth, the fastest at batch 1 and the fastest in batches (`split`, the tune's default). In batches
    as the tune times them: the server's batches (in the data's order, split) where measured, else sorted."""
    from model.tune import Measurement, choose_split, judge

    reference = variants.get("ort-balanced") or variants.get("torch-balanced")
    full = _full_depth_accuracy(variants)
    if reference is None:
        return None
    measured = []
    for key, candidate in BALANCED_CANDIDATES.items():
        if key not in variants:
            continue
        v = variants[key]
        agreement = _accuracy(v["batched_labels"], reference["batched_labels"])
        in_batches = v.get("server_sentences_per_s") or v["batched_sentences_per_s"]
        m = Measurement(candidate, v["batch1_mean_ms"], in_batches, v["threshold_value"])
        m.balanced_agreement, m.balanced_accuracy = agreement, v["accuracy"]
        measured.append(judge(m, full, has_answers=True))
    pair = choose_split(measured)
    if pair is None:
        return None
    single, batched = pair
    return single.candidate if single.candidate == batched.candidate else f"{single.candidate}+{batched.candidate}"


def exit_layer_profile(
    variants: dict[str, Any], num_layers: int, zero: str = "auto-zero", early: str = "auto-balanced"
) -> dict[str, Any] | None:
    """Where `early`'s batch-1 time goes, by the layer each sentence left at: its time against the same
    sentence's at threshold 0 (`zero`) and against the share of it that its layers are (t₀·i/n), and the
    savings those make: the paper's count, the count weighted by each sentence's full-depth time, and what was
    realized. None when either variant did not run or has no per-sentence times (runs before they were kept)."""
    zero_times = variants.get(zero, {}).get("batch1_fastest_us")
    early_times = variants.get(early, {}).get("batch1_fastest_us")
    layers = variants.get(early, {}).get("batch1_layers")
    if not zero_times or not early_times or not layers:
        return None
    per_layer = []
    for layer in range(1, num_layers + 1):
        rows = [i for i, left in enumerate(layers) if left == layer]
        if not rows:
            continue
        at_zero = statistics.fmean(zero_times[i] for i in rows) / 1e3
        at_exit = statistics.fmean(early_times[i] for i in rows) / 1e3
        proportional = at_zero * layer / num_layers
        per_layer.append(
            {"layer": layer, "sentences": len(rows), "zero_ms": at_zero, "early_ms": at_exit,
             "proportional_ms": proportional, "excess_ms": at_exit - proportional}
        )  # fmt: skip
    counted = expected_saving(layers, num_layers)
    weighted = time_weighted_saving(layers, zero_times, num_layers)
    realized = 1 - sum(early_times) / sum(zero_times)
    # Each sentence's excess as a fixed part plus a part per layer run (least squares over the sentences).
    excess_us = [early_times[i] - zero_times[i] * left / num_layers for i, left in enumerate(layers)]
    per_layer_us, fixed_us = (
        statistics.linear_regression(layers, excess_us) if len(set(layers)) > 1 else (None, statistics.fmean(excess_us))
    )
    return {
        "zero": zero,
        "early": early,
        "num_layers": num_layers,
        "excess_fixed_us": fixed_us,
        "excess_per_layer_us": per_layer_us,
        "expected_saving": counted,
        "time_weighted_expected_saving": weighted,
        "realized_saving": realized,
        "realized_vs_expected": realized / counted if counted else None,
        "realized_vs_time_weighted": realized / weighted if weighted else None,
        "per_layer": per_layer,
    }


def runtime_targets(variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 24's targets: deebert at balanced on the runtime `auto` chose, against the best plain variant."""

    def get(key: str | None, field_name: str) -> float | None:
        value = variants.get(key or "", {}).get(field_name)
        return float(value) if value is not None else None

    best = best_plain(variants)
    missing = "a variant it compares did not run"
    auto = "auto-balanced"
    full = _full_depth_accuracy(variants)
    accuracy = get(auto, "accuracy")
    drop = (full - accuracy) * 100 if full is not None and accuracy is not None else None
    loop_ratio = _ratio(get(auto, "batch1_mean_ms"), get("auto-zero", "batch1_mean_ms"))
    expected = get(auto, "expected_saving_batch1")
    realized = (1 - loop_ratio) / expected if loop_ratio is not None and expected else None
    chosen = variants.get(auto, {}).get("chosen")
    fastest = fastest_eligible(variants)
    t = RUNTIME_TARGETS
    targets = [
        target(f"balanced on auto's runtime ({chosen}) / best plain ({best['batched']}), batch-32 sentences/s",
               _ratio(get(auto, "batched_sentences_per_s"), get(best["batched"], "batched_sentences_per_s")),
               t["throughput_vs_best_plain"], True, "x", missing),
        target(f"balanced on auto's runtime ({chosen}), calls refilled between layers as `deebert classify` runs "
               f"them / best plain ({best['batched']}), batch-32 sentences/s",
               _ratio(get(auto, "refilled_sentences_per_s"), get(best["batched"], "batched_sentences_per_s")),
               t["throughput_vs_best_plain"], True, "x", missing),
        target(f"balanced on auto's runtime ({chosen}) / best plain ({best['batch1']}), batch-1 mean ms",
               _ratio(get(auto, "batch1_mean_ms"), get(best["batch1"], "batch1_mean_ms")),
               t["batch1_vs_best_plain"], False, "x", missing),
        target("balanced on auto's runtime: batch-1 time saved vs its threshold 0 / expected saving",
               realized, t["saving_realized"], True, "", missing),
        target("accuracy drop, balanced on auto's runtime vs fp32 full depth",
               drop, t["accuracy_drop_points"], False, " points", missing),
        target(f"auto's choice ({chosen}) is the fastest eligible here ({fastest}): 1 = yes",
               None if chosen is None or fastest is None else float(chosen == fastest), 1.0, True, "", missing),
    ]  # fmt: skip
    for key, runtime in (("ort-int8-static-balanced", "ONNX Runtime"), ("openvino-int8-static-balanced", "OpenVINO")):
        int8 = get(key, "accuracy")
        targets.append(target(f"static int8 balanced on {runtime}: accuracy drop vs fp32 full depth",
                              (full - int8) * 100 if full is not None and int8 is not None else None,
                              t["accuracy_drop_points"], False, " points", missing))  # fmt: skip
        targets.append(target(f"static int8 balanced on {runtime}: share of batch-1 labels equal to batched ones",
                              get(key, "batch1_vs_batched_label_agreement"), 1.0, True, "", missing))  # fmt: skip
    return targets


def peer_targets(variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets from one run's numbers (n/a where a variant did not run)."""

    def get(key: str, field_name: str) -> float | None:
        value = variants.get(key, {}).get(field_name)
        return float(value) if value is not None else None

    balanced_acc, full_acc = get("ort-balanced", "accuracy"), get("ort-zero", "accuracy")
    int8_acc = get("ort-int8-balanced", "accuracy")
    drop = (full_acc - balanced_acc) * 100 if balanced_acc is not None and full_acc is not None else None
    int8_drop = (full_acc - int8_acc) * 100 if int8_acc is not None and full_acc is not None else None
    missing = "a variant it compares did not run"
    batch1_ratio = _ratio(get("ort-balanced", "batch1_mean_ms"), get("ort-plain", "batch1_mean_ms"))
    # The batch-1 sentences' own expected saving (the same sentences the times are over).
    expected = get("ort-balanced", "expected_saving_batch1")
    realized = (1 - batch1_ratio) / expected if batch1_ratio is not None and expected else None
    t = TARGETS
    return [
        target("ORT exit loop at threshold 0 / plain ORT fp32, batch-1 ms",
                _ratio(get("ort-zero", "batch1_mean_ms"), get("ort-plain", "batch1_mean_ms")),
                t["loop_at_zero_vs_plain"], False, "x", missing),
        target("balanced on ORT fp32 / plain ORT fp32, batch-1 ms",
                batch1_ratio, t["balanced_vs_plain_batch1"], False, "x", missing),
        target("balanced on ORT fp32: batch-1 time saved vs plain ORT fp32 / expected saving",
                realized, t["balanced_saving_realized"], True, "", missing),
        target("plain PyTorch fp32 / balanced on ORT fp32, batch-1 ms (speed-up)",
                _ratio(get("torch-plain", "batch1_mean_ms"), get("ort-balanced", "batch1_mean_ms")),
                t["balanced_speedup_vs_torch"], True, "x", missing),
        target("balanced on ORT fp32 / plain ORT fp32, batch-32 sentences/s",
                _ratio(get("ort-balanced", "batched_sentences_per_s"), get("ort-plain", "batched_sentences_per_s")),
                t["balanced_throughput_vs_plain"], True, "x", missing),
        target("balanced on ORT fp32 / plain ORT int8, batch-32 sentences/s",
                _ratio(get("ort-balanced", "batched_sentences_per_s"),
                       get("ort-int8-plain", "batched_sentences_per_s")),
                t["balanced_throughput_vs_int8"], True, "x", missing),
        target("accuracy drop, balanced on ORT fp32 vs fp32 full depth",
                drop, t["accuracy_drop_points"], False, " points", missing),
        target("stretch: accuracy drop, int8 balanced vs fp32 full depth",
                int8_drop, t["accuracy_drop_points"], False, " points", missing),
        target("stretch: int8 balanced / plain ORT fp32, batch-32 sentences/s",
                _ratio(get("ort-int8-balanced", "batched_sentences_per_s"),
                       get("ort-plain", "batched_sentences_per_s")),
                t["int8_throughput_vs_plain"], True, "x", missing),
    ]  # fmt: skip


def _steal_sentence(stolen: float | None) -> str:
    """The run's CPU time stolen by the hypervisor, as a sentence after the machine's (empty where unknown)."""
    if stolen is None:
        return ""
    return f" CPU time stolen by the hypervisor for other guests during the run: {percent(stolen, 1)}."


def markdown_section(results: dict[str, Any], heading: str = "## Peer runtimes, in process") -> list[str]:
    """BENCHMARKS.md's section for a peers run: machine, command, the table, targets."""
    variants = results["variants"]
    s = results["settings"]
    rows = []
    for key in VARIANT_KEYS:
        if key not in variants:
            continue
        v = variants[key]
        threshold = "-" if v["threshold"] is None else f"{v['threshold']} ({v['threshold_value']:.3g})"
        label = v["label"]
        if v.get("chosen"):
            label += f": {v['chosen']}"
        elif v["precision"] == "default" and v.get("precision_used"):
            used = re.sub(r"^<Type: '(.*)'>$", r"\1", v["precision_used"])  # runs before the type's name was kept
            label += f" ({used.lower()} here)"
        rows.append(
            [
                label,
                threshold,
                f"{v['batch1_mean_ms']:.2f}",
                f"{v['batch1_p50_ms']:.2f}",
                f"{v['batched_sentences_per_s']:.0f}",
                f"{v['refilled_sentences_per_s']:.0f}" if "refilled_sentences_per_s" in v else "-",
                f"{v['server_sentences_per_s']:.0f}" if "server_sentences_per_s" in v else "-",
                f"{100 * v['accuracy']:.2f}",
                f"{100 * v['batch1_vs_batched_label_agreement']:.1f}",
                f"{100 * v['expected_saving_batched']:.1f}%",
            ]
        )
    header = ["variant", "threshold", "batch-1 mean ms", "batch-1 p50 ms", f"batch-{s['batch_size']} sentences/s",
              "refilled sentences/s", "server batches sentences/s", "dev accuracy %", "batch-1 = batched labels %",
              "expected saving"]  # fmt: skip
    out = [
        heading,
        "",
        f"{describe_machine(results['machine'])}. {s['threads']} threads per variant."
        + _steal_sentence(results.get("cpu_stolen")),
        "",
        f"`{results['command']}` (or `deebert bench --parts peers`), {results['elapsed_s']:.0f} s. Every variant "
        f"in its own process, interleaved: {s['rounds']} rounds of {results['samples']['batch1']} random dev "
        f"sentences one at a time (chunks of {s['chunk']}, variants in random order per chunk), then all "
        f"{results['samples']['batched']} sorted by length in batches of {s['batch_size']} (dynamic padding). "
        "Batch-1: per sentence the fastest of its rounds, then mean and median over sentences; batched: median "
        "over rounds. Model call only (tokenizing is left out, the same for all). Accuracy from the "
        "batched pass. Refilled (deebert variants): the same sorted batches run as `deebert classify` runs them, "
        f"rows that leave freeing their places in each layer's call for rows of later batches (at most "
        f"{s['batch_size']} rows per call), median over rounds. Server batches (deebert variants): every sentence in "
        f"the data's order in batches of {s['batch_size']}, each split into calls over texts of like length as "
        "`deebert serve` splits them (DEEBERT_BATCH_SPLIT_TOKENS), what `deebert tune` times in batches; the "
        "fastest eligible runtime is judged on these.",
        "",
        *markdown_table(header, rows),
        "",
    ]
    best = results.get("best_plain", {})
    if best.get("counted"):
        out.append(
            f"Best plain variant (of those within 0.5 point of fp32 full depth: {', '.join(best['counted'])}): "
            f"`{best['batch1']}` at batch 1, `{best['batched']}` in batches. Fastest eligible deebert runtime by "
            f"the tune's rule on these numbers: `{results.get('fastest_eligible')}`."
        )
        out.append("")
    for key, why in results.get("skipped", {}).items():
        out.append(f"- `{key}` not run: {why}")
    if results.get("skipped"):
        out.append("")
    out += markdown_table(
        ["target", "result", "numbers"], [[t["name"], t["status"], t["detail"]] for t in results["targets"]]
    )
    return [*out, "", *_profile_section(results.get("exit_layer_profile"))]


def _profile_section(profile: dict[str, Any] | None) -> list[str]:
    """The markdown of `exit_layer_profile`: the savings, then a row per exit layer."""
    if profile is None:
        return []
    rows = [
        [str(p["layer"]), str(p["sentences"]), f"{p['zero_ms']:.2f}", f"{p['early_ms']:.2f}",
         f"{p['proportional_ms']:.2f}", f"{1e3 * p['excess_ms']:.0f}"]
        for p in profile["per_layer"]
    ]  # fmt: skip
    header = ["left at layer", "sentences", "threshold 0 ms", f"{profile['early']} ms", "its layers' share ms",
              "excess µs"]  # fmt: skip
    weighted = profile["time_weighted_expected_saving"]
    return [
        f"Batch 1 by exit layer (`{profile['early']}` against `{profile['zero']}`, the same sentences): expected "
        f"saving {100 * profile['expected_saving']:.1f} % by the paper's count, {100 * weighted:.1f} % weighted by "
        f"each sentence's time at threshold 0, realized {100 * profile['realized_saving']:.1f} % "
        f"({profile['realized_vs_expected']:.2f} of the first, {profile['realized_vs_time_weighted']:.2f} of the "
        f"second). A sentence's share is its time at threshold 0 × the layers it ran / {profile['num_layers']}; "
        "its excess is what it took beyond that"
        + (
            f", by least squares over the sentences {profile['excess_fixed_us']:.0f} µs + "
            f"{profile['excess_per_layer_us']:.0f} µs per layer run."
            if profile["excess_per_layer_us"] is not None
            else "."
        ),
        "",
        *markdown_table(header, rows),
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = PeerSettings()
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=d.checkpoint)
    parser.add_argument("--data", default=d.data)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--batch1-rows", type=int, default=d.batch1_rows)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--tune-budget-s", type=float, default=d.tune_budget_s, help="auto without a cached tune: tune this long"
    )
    parser.add_argument(
        "--batch-split-tokens",
        type=int,
        default=None,
        help="the server's DEEBERT_BATCH_SPLIT_TOKENS for the server-batches pass (default: its CPU default)",
    )
    parser.add_argument("--variants", default=",".join(VARIANT_KEYS), help="comma-separated subset")
    parser.add_argument("--output", default="loadtest/results/peers/peers.json")
    args = parser.parse_args(argv)
    if args.worker:
        stored = json.loads(args.settings)
        stored["variants"] = tuple(stored["variants"])
        worker(args.worker, PeerSettings(**stored))
        return 0
    chosen = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(chosen) - set(VARIANT_KEYS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANT_KEYS)}")
    settings = PeerSettings(
        checkpoint=args.checkpoint,
        data=args.data,
        threads=args.threads,
        batch1_rows=args.batch1_rows,
        rounds=args.rounds,
        seed=args.seed,
        cache_dir=args.cache_dir,
        tune_budget_s=args.tune_budget_s,
        split_tokens=args.batch_split_tokens,
        variants=chosen,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results = run_peers(settings, log_path=output.with_suffix(".log"))
    write_json(results, output)
    print("\n".join(markdown_section(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
