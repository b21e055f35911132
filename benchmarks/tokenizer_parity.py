"""The Python WordPiece for printable ASCII (`model.ascii_wordpiece`) against the tokenizers library's Rust pipeline,
text by text: how many texts it takes, and whether it gives exactly the same token ids and type ids for each.

    python -m benchmarks.tokenizer_parity --checkpoint weights/sst2-minilm-l6 \\
        --data ../shared/data/sst2/train.tsv,../shared/data/sst2/dev.tsv,../shared/data/mrpc/train.tsv,...

Every text of every data file (with its pair, for pair tasks), then `--random` random printable-ASCII strings and
as many random sequences of words that split into pieces, have none or are too long for one (seeded). Exit status
1 on any difference, with the first few printed.
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.engine_runs import module_command
from loadtest.report import write_json
from model.ascii_wordpiece import AsciiWordPiece
from model.data import read_dataset
from model.tokenization import load_tokenizer
from reports.common import describe_machine, machine_description

WORD_PARTS = ["the", "un", "##", "able", "Token", "ization", "xyzzy", "q" * 30, "a1b2", "'s", "--", "a" * 101]


def random_inputs(count: int, seed: int) -> Iterator[str]:
    """`count` random printable-ASCII strings (tabs and line breaks too) and `count` random word sequences."""
    rng = random.Random(seed)
    characters = string.printable[:95] + "\t\n\r"
    for _ in range(count):
        yield "".join(rng.choice(characters) for _ in range(rng.randint(0, 60)))
        yield " ".join(rng.choice(WORD_PARTS) for _ in range(rng.randint(0, 8)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv", help="data files, comma-separated")
    parser.add_argument("--random", type=int, default=20_000, help="random strings (and as many word sequences)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON with the counts and the machine")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.checkpoint)
    backend: Any = tokenizer.backend_tokenizer
    pipeline = AsciiWordPiece.of(backend)
    if pipeline is None:
        print(f"{args.checkpoint}'s tokenizer is not BERT's WordPiece exactly: every text goes to the Rust pipeline")
        return 0
    sources: list[tuple[str, list[tuple[str, str | None]]]] = []
    for path in args.data.split(","):
        data = read_dataset(path)
        pairs: Sequence[str | None] = data.text_pairs or [None] * len(data.texts)
        sources.append((path, list(zip(data.texts, pairs, strict=True))))
    sources.append((f"random (seed {args.seed})", [(text, None) for text in random_inputs(args.random, args.seed)]))
    counts: dict[str, dict[str, int]] = {}
    differences: list[str] = []
    for name, inputs in sources:
        taken = different = 0
        for text, pair in inputs:
            answer = pipeline.encode(text, pair)
            if answer is None:
                continue
            taken += 1
            encoding = backend.encode(text) if pair is None else backend.encode(text, pair)
            if answer != (encoding.ids, encoding.type_ids):
                different += 1
                differences.append(repr((text, pair))[:200])
        counts[name] = {"inputs": len(inputs), "taken": taken, "different": different}
    machine = machine_description()
    print(describe_machine(machine))
    for name, count in counts.items():
        share = count["taken"] / max(count["inputs"], 1)
        print(
            f"  {name}: {count['inputs']} inputs, {count['taken']} taken ({share:.1%}), {count['different']} different"
        )
    for difference in differences[:5]:
        print(f"  differs: {difference}")
    if args.output:
        report = {"command": module_command("tokenizer_parity", argv), "machine": machine, "counts": counts}
        write_json({**report, "differences": differences[:100]}, args.output)
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
