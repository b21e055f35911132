"""The server's engine on batches of texts in arrival order: one batch at a time on the whole model (every thread)
against several batches at once on its stream copy (`DEEBERT_BATCH_STREAMS`: each batch on a share of the
threads), as `deebert serve` runs them without and with a backlog.

    python -m benchmarks.batch_streams --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv \
        --threads 2 --streams 1,2,3 --rounds 4 --output results.json

The engine is loaded as `deebert serve` loads it (`Engine.load`: the backend named, or `auto`'s choice; ONNX
Runtime's sessions with pools of their own, which a stream copy needs) and warmed. Per round the texts are shuffled
(texts that arrive one per request come in any order of length) and cut into batches of `--batch-size`; each
setting then runs all of them, in a new random order of the settings each round: `1` runs them one after another
through `run_batch` on the whole model, `N` > 1 hands them to N threads that each take the next batch and run it on
the stream copy (`run_batch(..., stream=True)`), the copy's threads being `--threads` divided by N as the server
divides them. Texts/s, median over rounds (a first, untimed round warms every setting). Tokenizing is left out.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from benchmarks.engine_runs import add_batch_run_arguments, add_engine_arguments, describe_engine, engine_report
from loadtest.report import write_json
from model.data import read_dataset
from model.tokenization import Encoded
from reports.common import describe_machine, machine_description
from server.engine import Engine, batch_streams, usable_cpus
from server.settings import ServerSettings


def texts_per_second(engine: Engine, batches: list[list[Encoded]], threshold: float, streams: int) -> float:
    """Texts/s of every batch through `run_batch`: one at a time on the whole model (`streams` 1), or taken in turn
    by `streams` threads, each running its batch on the stream copy."""
    texts = sum(map(len, batches))
    if streams == 1:
        started = time.perf_counter()
        for batch in batches:
            engine.run_batch(batch, [threshold] * len(batch), lambda row, outcome: None)
        return texts / (time.perf_counter() - started)
    pending = iter(batches)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def stream() -> None:
        while True:
            with lock:
                batch = next(pending, None)
            if batch is None:
                return
            try:
                engine.run_batch(batch, [threshold] * len(batch), lambda row, outcome: None, stream=True)
            except BaseException as err:  # re-raised on the calling thread
                errors.append(err)
                return

    threads = [threading.Thread(target=stream, name=f"stream-{n}") for n in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return texts / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_engine_arguments(parser)
    add_batch_run_arguments(parser, rounds=4)
    parser.add_argument("--streams", default="1,2", help="comma-separated stream counts; 1 = the whole model alone")
    args = parser.parse_args(argv)
    counts = [int(value) for value in args.streams.split(",")]
    most = max(counts)
    settings = ServerSettings(
        checkpoint=args.checkpoint,
        backend=args.backend,
        threads=args.threads,
        cache_dir=args.cache_dir,
        batch_streams=most if most > 1 else None,
    )
    engine = Engine.load(settings)
    copies: dict[int, Any] = {}
    for count in counts:
        if count > 1:
            streams, copy = batch_streams(engine.model, engine.device, count, args.threads)
            if streams != count:
                parser.error(f"{engine.backend} {engine.dtype_name} runs no batch streams here (see the log)")
            copies[count] = copy
    engine.warmup()
    data = read_dataset(args.data, label_names=engine.labels)
    texts = data.texts[: args.limit]
    pairs = data.text_pairs[: args.limit] if data.text_pairs is not None else None
    encoded = engine.tokenize(texts, pairs, True)
    threshold = engine.resolve_threshold(args.threshold).value if args.threshold else engine.default_threshold.value
    rng = random.Random(args.seed)
    rounds: list[dict[str, float]] = []
    for round_number in tqdm(range(args.rounds + 1), desc="rounds", disable=args.no_progress):
        arrival = list(range(len(encoded)))
        rng.shuffle(arrival)
        batches = [
            [encoded[row] for row in arrival[start : start + args.batch_size]]
            for start in range(0, len(arrival), args.batch_size)
        ]
        figures: dict[str, float] = {}
        for count in rng.sample(counts, len(counts)):
            if count > 1:
                engine.stream_model, engine.streams = copies[count], count
            figures[str(count)] = texts_per_second(engine, batches, threshold, count)
        if round_number:  # round 0 warms every setting at these shapes
            rounds.append(figures)
    summary = {count: statistics.median(r[str(count)] for r in rounds) for count in counts}
    machine = machine_description()
    threads = args.threads or usable_cpus()
    print(describe_machine(machine))
    print(describe_engine(engine, threshold))
    header = f"batches of {args.batch_size}, arrival order | threads per batch | texts/s (median of {args.rounds})"
    print(f"| {header} | / one |")
    print("| --- | ---: | ---: | ---: |")
    for count in counts:
        per_batch = threads if count == 1 else max(1, threads // count)
        label = "one at a time, the whole model" if count == 1 else f"{count} at once, the stream copy"
        print(f"| {label} | {per_batch} | {summary[count]:.0f} | {summary[count] / summary[counts[0]]:.2f} |")
    if args.output:
        report = {
            **engine_report("batch_streams", argv, engine, threshold, machine),
            "threads": threads,
            "texts": len(encoded),
            "batch_size": args.batch_size,
            "rounds": rounds,
            "summary": {f"streams_{count}_texts_per_s": rate for count, rate in summary.items()},
        }
        write_json(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
