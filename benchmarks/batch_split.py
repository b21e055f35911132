"""What a batch of texts in arrival order costs the server's engine whole, and split into calls over texts of like
length (`DEEBERT_BATCH_SPLIT_TOKENS`), against the same texts in length-sorted batches.

    python -m benchmarks.batch_split --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv \
        --backend onnxruntime --split-tokens 0,100,200,400 --rounds 3 --output results.json

The engine is loaded as `deebert serve` loads it (the backend named, or `auto`'s choice) and runs `run_batch`, the
server's batch path, at a threshold (default: the server's, `balanced`). Per round: the texts sorted by length in
batches of `--batch-size` (what `deebert classify` and the in-process peers measure), then shuffled (texts that
arrive one per request come in any order of length) and run in batches of that order, once per split setting, the
settings in a new random order each round. Texts/s, median over rounds. Tokenizing is left out.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from benchmarks.engine_runs import (
    add_batch_run_arguments,
    add_engine_arguments,
    describe_engine,
    engine_report,
    load_engine,
)
from loadtest.report import write_json
from model.data import read_dataset
from model.tokenization import Encoded, arrival_batches
from reports.common import describe_machine, machine_description
from server.engine import Engine


def texts_per_second(
    engine: Engine, encoded: list[Encoded], order: list[int], batch_size: int, threshold: float
) -> float:
    """Texts/s of `run_batch` over `encoded` in batches of `batch_size`, in `order`."""
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [encoded[row] for row in order[start : start + batch_size]]
        engine.run_batch(batch, [threshold] * len(batch), lambda row, outcome: None)
    return len(order) / (time.perf_counter() - started)


def calls_per_batch(encoded: list[Encoded], order: list[int], batch_size: int, split_tokens: int) -> float:
    """How many calls a batch of `order` runs as, on average, at this split setting."""
    calls = arrival_batches([len(encoded[row]) for row in order], batch_size, split_tokens)
    return len(calls) / math.ceil(len(order) / batch_size)


def padding_share(encoded: list[Encoded], order: list[int], batch_size: int) -> float:
    """Share of the padded tokens of whole batches in this order that are padding."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        lengths = [len(encoded[row]) for row in order[start : start + batch_size]]
        padded += len(lengths) * max(lengths)
        real += sum(lengths)
    return 1 - real / padded


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_engine_arguments(parser)
    add_batch_run_arguments(parser, rounds=3)
    parser.add_argument("--split-tokens", default="0,100,200,400", help="comma-separated; 0 = batches whole")
    args = parser.parse_args(argv)
    engine = load_engine(args, args.cache_dir)
    data = read_dataset(args.data, label_names=engine.labels)
    texts = data.texts[: args.limit]
    pairs = data.text_pairs[: args.limit] if data.text_pairs is not None else None
    encoded = engine.tokenize(texts, pairs, True)
    threshold = engine.resolve_threshold(args.threshold).value if args.threshold else engine.default_threshold.value
    settings_to_try = [int(value) for value in args.split_tokens.split(",")]
    by_length = sorted(range(len(encoded)), key=lambda row: len(encoded[row]))
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    for _ in tqdm(range(args.rounds), desc="rounds", disable=args.no_progress):
        arrival = list(range(len(encoded)))
        rng.shuffle(arrival)
        engine.split_tokens = 0
        figures: dict[str, Any] = {"sorted": texts_per_second(engine, encoded, by_length, args.batch_size, threshold)}
        for split_tokens in rng.sample(settings_to_try, len(settings_to_try)):
            engine.split_tokens = split_tokens
            rate = texts_per_second(engine, encoded, arrival, args.batch_size, threshold)
            figures[f"arrival_split_{split_tokens}"] = rate
            figures[f"arrival_split_{split_tokens}_calls_per_batch"] = calls_per_batch(
                encoded, arrival, args.batch_size, split_tokens
            )
        figures["arrival_padding_share"] = padding_share(encoded, arrival, args.batch_size)
        rounds.append(figures)
    sorted_rate = statistics.median(r["sorted"] for r in rounds)
    summary: dict[str, Any] = {
        "sorted_texts_per_s": sorted_rate,
        "sorted_padding_share": padding_share(encoded, by_length, args.batch_size),
        "arrival_padding_share": statistics.median(r["arrival_padding_share"] for r in rounds),
    }
    machine = machine_description()
    print(describe_machine(machine))
    print(describe_engine(engine, threshold))
    print(f"| batches of {args.batch_size} | texts/s (median of {args.rounds}) | / sorted | calls per batch |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| length-sorted, whole | {sorted_rate:.0f} | 1.00 | 1.00 |")
    for split_tokens in settings_to_try:
        rate = statistics.median(r[f"arrival_split_{split_tokens}"] for r in rounds)
        calls = statistics.median(r[f"arrival_split_{split_tokens}_calls_per_batch"] for r in rounds)
        summary[f"arrival_split_{split_tokens}_texts_per_s"] = rate
        label = "whole" if split_tokens == 0 else f"split, {split_tokens} tokens a call"
        print(f"| arrival order, {label} | {rate:.0f} | {rate / sorted_rate:.2f} | {calls:.2f} |")
    if args.output:
        report = {
            **engine_report("batch_split", argv, engine, threshold, machine),
            "texts": len(encoded),
            "batch_size": args.batch_size,
            "rounds": rounds,
            "summary": summary,
        }
        write_json(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
