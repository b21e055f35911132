"""What the benchmarks that load the server's engine in process share: their flags, the engine loaded as
`deebert serve` loads it, and the command line a report records."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.engine import Engine
from server.settings import ServerSettings


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --data, --backend and --threads, as `deebert serve` takes them."""
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--backend", default="auto", help="as DEEBERT_BACKEND (auto: the tuned choice)")
    parser.add_argument("--threads", type=int, default=None)


def add_batch_run_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The flags of a benchmark that runs the data through the engine in batches, in rounds: the threshold, the
    batch size, the rounds, how many texts, the shuffle's seed, the graph cache, the JSON report, the progress bar."""
    parser.add_argument("--threshold", default=None, help="number or preset (default: the server's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--limit", type=int, default=None, help="first N texts of the data (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", type=Path, help="JSON with every round, the summary and the machine")
    parser.add_argument("--no-progress", action="store_true")


def load_engine(args: argparse.Namespace, cache_dir: str | None = None, warm_batches: bool = True) -> Engine:
    """The engine `deebert serve` would load with these flags (and `cache_dir`), warmed up (batches of one only,
    unless `warm_batches`)."""
    settings = ServerSettings(
        checkpoint=args.checkpoint, backend=args.backend, threads=args.threads, cache_dir=cache_dir
    )
    engine = Engine.load(settings)
    engine.warmup(batches=warm_batches)
    return engine


def module_command(module: str, argv: Sequence[str] | None) -> str:
    """`python -m benchmarks.MODULE ...` as it was run (`argv`, or this process's arguments)."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(argv if argv is not None else sys.argv[1:])])


def describe_engine(engine: Engine, threshold: float) -> str:
    """The engine a report measured, in a line: model, runtime and precision, why it serves, the threshold."""
    return f"{engine.name} on {engine.backend} {engine.dtype_name} ({engine.backend_reason}), threshold {threshold:.4g}"


def engine_report(
    module: str, argv: Sequence[str] | None, engine: Engine, threshold: float, machine: Any
) -> dict[str, Any]:
    """The fields every such report starts with: its command, the machine, and the engine it measured."""
    return {
        "command": module_command(module, argv),
        "machine": machine,
        "model": engine.name,
        "backend": engine.backend,
        "dtype": engine.dtype_name,
        "backend_reason": engine.backend_reason,
        "threshold": threshold,
    }
