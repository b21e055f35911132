"""Two `deebert serve` configurations against each other under wrk, in interleaved pairs of server runs.

    python -m benchmarks.server_ab --a thread:DEEBERT_INLINE_ALONE=false --b inline: \\
        --pairs 3 --connections 1,4,32 --duration 8 --output loadtest/results/overhead/inline_alone_ab.json

A configuration is `NAME:` followed by `DEEBERT_*` settings (`NAME:KEY=VALUE,KEY=VALUE`; `NAME:` alone is the
defaults). Each pair starts a server per configuration, A first in odd pairs and B first in even ones; each
server takes `wrk -t1 -c C --latency -s loadtest/wrk_post.lua` at every concurrency C (a warm-up run, then a
timed one) on one text per request: random sentences of `--data`, at the server's default threshold unless
`--threshold` sets the `X-Exit-Threshold` header. wrk runs on the same CPUs as the server, as in `deebert
bench`.

A shared VM's speed drifts by ±15-30 % between processes and over minutes: a single pair says little; the
pairs, side by side, and their ratios do. An untimed server run of A comes first (the first server of a run
often measured slow). The JSON keeps every run, the machine and the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtest.bench import parse_wrk, write_wrk_bodies, wrk_command
from loadtest.generator import Workload
from loadtest.report import write_json
from loadtest.servers import BenchError, deebert_server_command, free_port, model_info, server_process
from reports.common import describe_machine, machine_description


@dataclass(frozen=True)
class Configuration:
    name: str
    settings: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Configuration:
        """`NAME:KEY=VALUE,KEY=VALUE` (`NAME:` alone: the defaults); every key a `DEEBERT_*` setting."""
        name, _, rest = text.partition(":")
        if not name:
            raise ValueError(f"{text!r}: a configuration starts with its name, e.g. default: or thread:KEY=VALUE")
        settings: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, equals, value = item.partition("=")
            if not equals or not key.startswith("DEEBERT_"):
                raise ValueError(f"{item!r} in {text!r}: settings are DEEBERT_KEY=VALUE")
            settings[key] = value
        return cls(name, settings)


def run_wrk(url: str, connections: int, seconds: int, bodies: Path, threshold: str | None) -> dict[str, Any]:
    argv, env = wrk_command(f"{url}/v1/classify", connections, seconds, bodies, threshold or "")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr[-500:]}")
    return parse_wrk(done.stdout)


@contextlib.contextmanager
def serving(args: argparse.Namespace, configuration: Configuration) -> Iterator[str]:
    """`deebert serve` on the checkpoint with the configuration's settings; its URL while it runs."""
    port = free_port()
    env = {"DEEBERT_LOG_LEVEL": "warning", **configuration.settings}
    with server_process(deebert_server_command(args.checkpoint, port), env, port, args.startup_timeout) as (_, url):
        yield url


def warm_up_machine(args: argparse.Namespace, configuration: Configuration, bodies: Path) -> None:
    """One untimed server run first: the first server of a run often measured slow (page cache, CPU clocks)."""
    with serving(args, configuration) as url:
        for connections in args.connections:
            run_wrk(url, connections, args.warmup, bodies, args.threshold)


def run_pairs(args: argparse.Namespace, configurations: Sequence[Configuration], bodies: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    steps = args.pairs * len(configurations)
    if not args.no_warmup_server:
        warm_up_machine(args, configurations[0], bodies)
    with tqdm(total=steps, desc="server runs", disable=args.no_progress) as progress:
        for pair in range(1, args.pairs + 1):
            order = configurations if pair % 2 else list(reversed(configurations))
            for configuration in order:
                with serving(args, configuration) as url:
                    served = model_info(url)
                    for connections in args.connections:
                        run_wrk(url, connections, args.warmup, bodies, args.threshold)
                        result = run_wrk(url, connections, args.duration, bodies, args.threshold)
                        runs.append(
                            {
                                "pair": pair,
                                "configuration": configuration.name,
                                "connections": connections,
                                "backend": served.get("backend"),
                                "dtype": served.get("dtype"),
                                **result,
                            }
                        )
                progress.update()
    return runs


def summarize(runs: Sequence[dict[str, Any]], configurations: Sequence[Configuration]) -> list[dict[str, Any]]:
    """Per concurrency: each configuration's requests/s per pair and median, and B / A per pair."""
    first, second = configurations
    rows = []
    for connections in sorted({run["connections"] for run in runs}):
        per: dict[str, dict[int, dict[str, Any]]] = {c.name: {} for c in configurations}
        for run in runs:
            if run["connections"] == connections:
                per[run["configuration"]][run["pair"]] = run
        pairs = sorted(set(per[first.name]) & set(per[second.name]))
        ratios = [per[second.name][p]["throughput_rps"] / per[first.name][p]["throughput_rps"] for p in pairs]
        rows.append(
            {
                "connections": connections,
                **{
                    c.name: {
                        "rps": [per[c.name][p]["throughput_rps"] for p in pairs],
                        "median_rps": statistics.median(per[c.name][p]["throughput_rps"] for p in pairs),
                        "median_p50_ms": statistics.median(per[c.name][p]["latency_ms"].get("p50", 0) for p in pairs),
                    }
                    for c in configurations
                },
                "b_over_a": ratios,
                "median_b_over_a": statistics.median(ratios),
                "pairs_b_faster": sum(r > 1 for r in ratios),
            }
        )
    return rows


def format_summary(report: dict[str, Any]) -> str:
    a, b = (c["name"] for c in report["configurations"])
    lines = [
        f"`{report['command']}`",
        "",
        describe_machine(report["machine"]),
        "",
        f"| wrk connections | {a} requests/s (per pair) | {b} requests/s (per pair) | {b} / {a} per pair | median |",
        "| ---: | --- | --- | --- | ---: |",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['connections']} | {', '.join(f'{x:.0f}' for x in row[a]['rps'])} "
            f"| {', '.join(f'{x:.0f}' for x in row[b]['rps'])} | {', '.join(f'{x:.2f}' for x in row['b_over_a'])} "
            f"| {row['median_b_over_a']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--a", required=True, help="configuration A: NAME:DEEBERT_KEY=VALUE,... (NAME: = defaults)")
    parser.add_argument("--b", required=True, help="configuration B, the same way")
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2/dev.tsv"))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--connections", default="32", help="wrk concurrencies, comma-separated (32)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of each timed wrk run (10)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of wrk before each timed run (3)")
    parser.add_argument("--threshold", help="X-Exit-Threshold of every request (default: the server's default)")
    parser.add_argument("--no-warmup-server", action="store_true", help="skip the untimed server run before the pairs")
    parser.add_argument("--texts", type=int, default=500, help="distinct request bodies wrk cycles through (500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--output", type=Path, help="JSON with every run, the summary and the machine")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not on PATH (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    try:
        configurations = [Configuration.parse(args.a), Configuration.parse(args.b)]
        args.connections = [int(c) for c in args.connections.split(",")]
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if configurations[0].name == configurations[1].name:
        print("the two configurations need different names", file=sys.stderr)
        return 2
    machine = machine_description()
    with tempfile.TemporaryDirectory() as scratch:
        bodies = Path(scratch) / "bodies.jsonl"
        write_wrk_bodies(Workload.from_file(args.data), bodies, args.texts, args.seed)
        runs = run_pairs(args, configurations, bodies)
    report = {
        "command": "python -m benchmarks.server_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "configurations": [{"name": c.name, "settings": c.settings} for c in configurations],
        "wrk": f"wrk -t1 -cC -d{args.duration}s --latency -s loadtest/wrk_post.lua (after {args.warmup} s of warm-up)",
        "runs": runs,
        "summary": summarize(runs, configurations),
    }
    if args.output:
        write_json(report, args.output)
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
