"""What the benchmarks that load the server's engine in process share: their flags, the engine loaded as
`deebert serve` loads it, and the command line a report records."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from server.engine import Engine
from server.settings import ServerSettings


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --data, --backend and --threads, as `deebert serve` takes them."""
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--backend", default="auto", help="as DEEBERT_BACKEND (auto: the tuned choice)")
    parser.add_argument("--threads", type=int, default=None)


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
