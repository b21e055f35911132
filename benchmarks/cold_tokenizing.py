"""What tokenizing one text costs where the server tokenizes it: right after the model's batch-1 call (caches cold),
after another tokenizing call, after an idle gap, and the same text again at once.

    python -m benchmarks.cold_tokenizing --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv

The server's engine, loaded as `deebert serve` loads it; per text, in turn: tokenize it (after the previous text's
second tokenizing: "after another tokenize"), run it alone at the server's default threshold, tokenize it again
("right after the model's call"). Then the same with an idle gap (`--gaps-ms`) between the model's call and the
tokenizing. p50s over the texts (the first `--skip` left out), in µs.

Each situation is also measured, interleaved, with the tokenizers library's Rust pipeline called directly
(`backend_tokenizer.encode`, the ids and type ids read: how the server tokenized every text before BENCHMARKS.md
§29), so the Python WordPiece for printable ASCII (`model.ascii_wordpiece`) is compared with it in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.engine_runs import add_engine_arguments, load_engine, module_command
from loadtest.report import write_json
from model.data import read_dataset
from reports.common import describe_machine, machine_description


def p50_us(values: Sequence[float]) -> float:
    return 1e6 * statistics.median(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_engine_arguments(parser)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--skip", type=int, default=20, help="first texts left out of the p50s (warm-up)")
    parser.add_argument("--gaps-ms", default="0.2,1,3,10", help="idle gaps after the model's call, comma-separated")
    parser.add_argument("--output", type=Path, help="JSON with the figures and the machine")
    args = parser.parse_args(argv)
    engine = load_engine(args, warm_batches=False)
    data = read_dataset(args.data, label_names=engine.labels)
    texts = data.texts[: args.texts]
    pairs = data.text_pairs[: args.texts] if data.text_pairs is not None else None
    threshold = engine.default_threshold.value
    clock = time.perf_counter

    def tokenize(index: int) -> float:
        started = clock()
        engine.tokenize([texts[index]], [pairs[index]] if pairs else None, True)
        return clock() - started

    backend: Any = getattr(engine.tokenizer, "backend_tokenizer")  # noqa: B009 (the engine's tokenizer is typed loosely)

    def rust(index: int) -> float:
        started = clock()
        encoding = backend.encode(texts[index]) if pairs is None else backend.encode(texts[index], pairs[index])
        encoding.ids, encoding.type_ids  # noqa: B018 (read as the server read them)
        return clock() - started

    def run(index: int) -> None:
        encoded = engine.tokenize([texts[index]], [pairs[index]] if pairs else None, True)
        engine.run_batch(encoded, [threshold], lambda row, outcome: None)

    after_tokenize, after_model, again = [], [], []
    rust_after_tokenize, rust_after_model, rust_again = [], [], []
    for index in range(len(texts)):
        tokenize(index - 1)  # (each path's "after another tokenize" comes after a call of its own)
        after_tokenize.append(tokenize(index))
        run(index)
        after_model.append(tokenize(index))
        again.append(tokenize(index))
        rust(index - 1)
        rust_after_tokenize.append(rust(index))
        run(index)
        rust_after_model.append(rust(index))
        rust_again.append(rust(index))
    figures: dict[str, Any] = {
        "right_after_model_call_us": p50_us(after_model[args.skip :]),
        "after_another_tokenize_us": p50_us(after_tokenize[args.skip :]),
        "same_text_again_us": p50_us(again[args.skip :]),
        "rust_right_after_model_call_us": p50_us(rust_after_model[args.skip :]),
        "rust_after_another_tokenize_us": p50_us(rust_after_tokenize[args.skip :]),
        "rust_same_text_again_us": p50_us(rust_again[args.skip :]),
    }
    for gap_ms in (float(value) for value in args.gaps_ms.split(",")):
        times, rust_times = [], []
        for index in range(len(texts)):
            run(index)
            time.sleep(gap_ms / 1000)
            times.append(tokenize(index))
            run(index)
            time.sleep(gap_ms / 1000)
            rust_times.append(rust(index))
        figures[f"after_model_call_and_{gap_ms:g}_ms_idle_us"] = p50_us(times[args.skip :])
        figures[f"rust_after_model_call_and_{gap_ms:g}_ms_idle_us"] = p50_us(rust_times[args.skip :])
    machine = machine_description()
    print(describe_machine(machine))
    print(f"{engine.name} on {engine.backend} {engine.dtype_name}; {len(texts)} texts, p50 µs of one tokenizing call")
    print("(the server's path, then `rust_`: the tokenizers library's Rust pipeline called directly):")
    for name, value in figures.items():
        print(f"  {name.removesuffix('_us').replace('_', ' ')}: {value:.1f}")
    if args.output:
        command = module_command("cold_tokenizing", argv)
        report = {"command": command, "machine": machine, "model": engine.name, "backend": engine.backend}
        write_json({**report, "texts": len(texts), "figures": figures}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
