"""Two `deebert serve` configurations against each other under wrk, in interleaved pairs of server runs.

    python -m benchmarks.server_ab --a alone: --b all:DEEBERT_BATCHES_ON_LOOP=all \\
        --pairs 4 --connections 32,4,1 --duration 8 --output loadtest/results/overhead/batches_on_loop_ab.json

A configuration is `NAME:` followed by `DEEBERT_*` settings (`NAME:KEY=VALUE,KEY=VALUE`; `NAME:` alone is the
defaults). Each pair starts a server per configuration, A first in odd pairs and B first in even ones; each
server takes `wrk -t1 -c C --latency -s loadtest/wrk_post.lua` at every concurrency C (a warm-up run, then a
timed one) on one text per request: random sentences of `--data`, at the server's default threshold unless
`--threshold` sets the `X-Exit-Threshold` header. wrk runs on the same CPUs as the server, as in `deebert
bench`.

`--overhead-requests N` also measures, before wrk, where one request's time goes in the server: N requests on one
keep-alive connection (after N/4 untimed ones), one at a time, and the p50s of the server's own timing headers:
its overhead (`X-Total-Time` − `X-Compute-Time`), split into tokenizing, queueing and the rest, with the model's
time and the client's round trip beside them. `--connections 0` skips wrk. `--overhead-client generator` sends
them with the load generator's raw asyncio client (as `deebert bench`'s batch-1 part does), which sends its next
request sooner after an answer than the default blocking `http.client`; `--overhead-pause-ms P` waits P ms after each
answer, as sparser traffic would.

`--a-source DIR` (`--b-source DIR`) runs that configuration's server from another source tree, e.g. a `git
worktree add /tmp/before HEAD~1` of the commit before a change, so that two versions of the code compare:

    python -m benchmarks.server_ab --a before: --a-source /tmp/before --b after: --pairs 4 --connections 0 \
        --overhead-requests 200

A shared VM's speed drifts by ±15-30 % between processes and over minutes: a single pair says little; the
pairs, side by side, and their ratios do (for the overhead, also as a share of the model's time in the same run,
which moves with the VM's speed as the overhead does). An untimed server run of A comes first (the first server
of a run often measured slow). The JSON keeps every run, the machine and the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtest.bench import parse_wrk, write_wrk_bodies, wrk_command
from loadtest.generator import Workload, timing_headers
from loadtest.rawhttp import RawClient
from loadtest.records import RequestRecord
from loadtest.report import server_timing, write_json
from loadtest.servers import REPO_ROOT, BenchError, deebert_server_command, free_port, model_info, server_process
from reports.common import cpu_times, describe_machine, machine_description, percent, stolen_share
from server.protocol import CLASSIFY_PATH, THRESHOLD_HEADER


@dataclass(frozen=True)
class Configuration:
    name: str
    settings: dict[str, str]
    source: Path | None = None  # another source tree to serve from (None: this checkout)

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


def measure_overhead(
    url: str,
    bodies: Sequence[bytes],
    requests: int,
    threshold: str | None,
    client: str = "socket",
    pause_s: float = 0.0,
) -> dict[str, Any]:
    """`requests` one-text requests on one keep-alive connection, one at a time (after a quarter as many untimed):
    the p50 (ms) of the server's overhead (total − compute) and of its parts, split as the load generator's report
    splits them (`loadtest.report.server_timing`), the model's time and the client's round trip, and the overhead
    and its rest as shares of the model's time. `client`: "socket" (`http.client`, blocking) or "generator" (the
    load generator's raw asyncio client, as `deebert bench`'s batch-1 part sends; it sends its next request sooner
    after an answer). `pause_s`: how long the client waits after each answer before its next request (0: none)."""
    headers = {"Content-Type": "application/json"} | ({THRESHOLD_HEADER: threshold} if threshold else {})
    warmup = max(1, requests // 4)
    round_trip = _generator_round_trips if client == "generator" else _socket_round_trips
    records: list[RequestRecord] = []
    for index, (latency, status, response) in enumerate(round_trip(url, bodies, warmup + requests, headers, pause_s)):
        if status != 200:
            raise BenchError(f"POST {CLASSIFY_PATH} answered {status}")
        if index >= warmup:
            records.append(RequestRecord("200", latency, 1, threshold, **timing_headers(response)))
    timing = server_timing(records)
    p50 = {f"{name}_p50_ms": timing[f"{name}_ms"]["p50"] for name in ("overhead", "tokenization", "queue", "compute")}
    p50["rest_p50_ms"] = timing["overhead_rest_ms"]["p50"]
    p50["round_trip_p50_ms"] = 1000 * statistics.median(record.latency_s for record in records)
    overhead, rest, compute = p50["overhead_p50_ms"], p50["rest_p50_ms"], p50["compute_p50_ms"]
    return {
        "requests": requests,
        "client": client,
        "pause_ms": 1000 * pause_s,
        **p50,
        "overhead_per_compute": overhead / compute if overhead is not None and compute else None,
        "rest_per_compute": rest / compute if rest is not None and compute else None,
    }


def overhead_of(args: argparse.Namespace, url: str, bodies: Sequence[bytes]) -> dict[str, Any]:
    """`measure_overhead` with the command line's requests, threshold, client and pause."""
    return measure_overhead(
        url, bodies, args.overhead_requests, args.threshold, args.overhead_client, args.overhead_pause_ms / 1000
    )


RoundTrip = tuple[float, int, Any]  # (seconds, status, the response: its `.headers` are read)


def _socket_round_trips(
    url: str, bodies: Sequence[bytes], count: int, headers: dict[str, str], pause_s: float
) -> list[RoundTrip]:
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    trips: list[RoundTrip] = []
    try:
        for index in range(count):
            started = time.perf_counter()
            connection.request("POST", CLASSIFY_PATH, bodies[index % len(bodies)], headers)
            response = connection.getresponse()
            response.read()
            trips.append((time.perf_counter() - started, response.status, response))
            if pause_s:
                time.sleep(pause_s)
    finally:
        connection.close()
    return trips


def _generator_round_trips(
    url: str, bodies: Sequence[bytes], count: int, headers: dict[str, str], pause_s: float
) -> list[RoundTrip]:
    extra = {name: value for name, value in headers.items() if name != "Content-Type"}  # (the client sends it)

    async def run() -> list[RoundTrip]:
        client = RawClient(url, timeout=60, max_connections=1)
        trips: list[RoundTrip] = []
        try:
            for index in range(count):
                body = json.loads(bodies[index % len(bodies)])
                started = time.perf_counter()
                response = await client.post(CLASSIFY_PATH, json=body, headers=extra)
                trips.append((time.perf_counter() - started, response.status_code, response))
                if pause_s:
                    await asyncio.sleep(pause_s)
        finally:
            await client.aclose()
        return trips

    return asyncio.run(run())


@contextlib.contextmanager
def serving(args: argparse.Namespace, configuration: Configuration) -> Iterator[str]:
    """`deebert serve` on the checkpoint with the configuration's settings (from its source tree); its URL while it
    runs."""
    port = free_port()
    env = {"DEEBERT_LOG_LEVEL": "warning", **configuration.settings}
    command = deebert_server_command(str(Path(args.checkpoint).resolve()), port)
    with server_process(command, env, port, args.startup_timeout, source=configuration.source) as (_, url):
        yield url


def warm_up_machine(args: argparse.Namespace, configuration: Configuration, bodies: Path) -> None:
    """One untimed server run first: the first server of a run often measured slow (page cache, CPU clocks)."""
    with serving(args, configuration) as url:
        if args.overhead_requests:
            overhead_of(args, url, read_bodies(bodies))
        for connections in args.connections:
            run_wrk(url, connections, args.warmup, bodies, args.threshold)


def read_bodies(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line]


def run_pairs(
    args: argparse.Namespace, configurations: Sequence[Configuration], bodies: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """wrk's runs and the overhead runs, each tagged with its pair and configuration."""
    runs: list[dict[str, Any]] = []
    overheads: list[dict[str, Any]] = []
    request_bodies = read_bodies(bodies)
    steps = args.pairs * len(configurations)
    if not args.no_warmup_server:
        warm_up_machine(args, configurations[0], bodies)
    with tqdm(total=steps, desc="server runs", disable=args.no_progress) as progress:
        for pair in range(1, args.pairs + 1):
            order = configurations if pair % 2 else list(reversed(configurations))
            for configuration in order:
                with serving(args, configuration) as url:
                    served = model_info(url)
                    if args.overhead_requests:
                        before = cpu_times()
                        measured = overhead_of(args, url, request_bodies)
                        # Each measurement with the share of CPU time the hypervisor gave other guests meanwhile.
                        measured["cpu_stolen"] = stolen_share(before, cpu_times())
                        overheads.append({"pair": pair, "configuration": configuration.name, **measured})
                    for connections in args.connections:
                        run_wrk(url, connections, args.warmup, bodies, args.threshold)
                        before = cpu_times()
                        result = run_wrk(url, connections, args.duration, bodies, args.threshold)
                        result["cpu_stolen"] = stolen_share(before, cpu_times())
                        runs.append(
                            {
                                "pair": pair,
                                "configuration": configuration.name,
                                "connections": connections,
                                "backend": served.get("backend"),
                                "dtype": served.get("dtype"),
                                "batches_on_loop": served.get("batches_on_loop"),
                                **result,
                            }
                        )
                progress.update()
    return runs, overheads


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


OVERHEAD_FIELDS = ("overhead_p50_ms", "tokenization_p50_ms", "queue_p50_ms", "rest_p50_ms", "compute_p50_ms",
                   "round_trip_p50_ms", "overhead_per_compute", "rest_per_compute")  # fmt: skip


def summarize_overhead(overheads: Sequence[dict[str, Any]], configurations: Sequence[Configuration]) -> dict[str, Any]:
    """Per configuration, each field's values per pair and their median; B / A of each field per pair."""
    first, second = configurations
    per = {c.name: {run["pair"]: run for run in overheads if run["configuration"] == c.name} for c in configurations}
    pairs = sorted(set(per[first.name]) & set(per[second.name]))
    summary: dict[str, Any] = {"pairs": pairs}
    for c in configurations:
        summary[c.name] = {
            field: {"values": values, "median": statistics.median(values)}
            for field in OVERHEAD_FIELDS
            for values in [[per[c.name][p][field] for p in pairs]]
        }
    summary["b_over_a"] = {
        field: [per[second.name][p][field] / per[first.name][p][field] for p in pairs] for field in OVERHEAD_FIELDS
    }
    return summary


def _steal_sentence(report: dict[str, Any]) -> str:
    """The CPU time stolen by the hypervisor during the measurements, per configuration (its runs' median and
    highest share): a pair whose runs differ here was measured at two speeds of the VM."""
    parts = []
    for name in (c["name"] for c in report["configurations"]):
        shares = [
            run["cpu_stolen"]
            for run in [*report.get("runs", []), *report.get("overhead_runs", [])]
            if run["configuration"] == name and run.get("cpu_stolen") is not None
        ]
        if shares:
            parts.append(f"{name} median {percent(statistics.median(shares), 1)}, highest {percent(max(shares), 1)}")
    return f". CPU time stolen by the hypervisor while measuring: {'; '.join(parts)}" if parts else ""


def format_summary(report: dict[str, Any]) -> str:
    a, b = (c["name"] for c in report["configurations"])
    lines = [
        f"`{report['command']}`",
        "",
        describe_machine(report["machine"]) + _steal_sentence(report),
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
    overhead = report.get("overhead")
    if overhead and overhead["pairs"]:
        lines += [
            "",
            f"One request at a time ({report['overhead_requests']} per server run, client: "
            f"{report.get('overhead_client', 'socket')}, pause {report.get('overhead_pause_ms', 0):g} ms), p50s in ms "
            "(`_per_compute`: as a share of the model's time):",
            "",
            f"| | {a} (per pair) | {b} (per pair) | {b} / {a} per pair | median |",
            "| --- | --- | --- | --- | ---: |",
        ]
        for field in OVERHEAD_FIELDS:
            ratios = overhead["b_over_a"][field]
            lines.append(
                f"| {field} | {', '.join(f'{x:.3f}' for x in overhead[a][field]['values'])} "
                f"| {', '.join(f'{x:.3f}' for x in overhead[b][field]['values'])} "
                f"| {', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--a", required=True, help="configuration A: NAME:DEEBERT_KEY=VALUE,... (NAME: = defaults)")
    parser.add_argument("--b", required=True, help="configuration B, the same way")
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2/dev.tsv"))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--a-source", type=Path, help="serve A from this source tree (default: this checkout)")
    parser.add_argument("--b-source", type=Path, help="serve B from this source tree (default: this checkout)")
    parser.add_argument("--connections", default="32", help="wrk concurrencies, comma-separated (32; 0: no wrk)")
    parser.add_argument(
        "--overhead-requests", type=int, default=0, help="requests one at a time per server run for the overhead (0)"
    )
    parser.add_argument(
        "--overhead-client",
        choices=("socket", "generator"),
        default="socket",
        help="the client of the overhead requests: socket (blocking http.client) or generator (the load generator's "
        "raw asyncio client, as deebert bench's batch-1 part; it sends its next request sooner after an answer)",
    )
    parser.add_argument(
        "--overhead-pause-ms",
        type=float,
        default=0.0,
        help="the overhead client's pause after each answer, ms (0): sparse traffic finds the CPU's caches colder",
    )
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
    try:
        configurations = [
            dataclasses.replace(Configuration.parse(args.a), source=args.a_source),
            dataclasses.replace(Configuration.parse(args.b), source=args.b_source),
        ]
        args.connections = [c for c in (int(c) for c in args.connections.split(",")) if c > 0]
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    for source in (args.a_source, args.b_source):
        if source is not None and not (source / "deebert" / "__main__.py").is_file():
            print(f"{source} is not a deebert source tree", file=sys.stderr)
            return 2
    if args.connections and shutil.which("wrk") is None:
        print("wrk is not on PATH (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    if not args.connections and not args.overhead_requests:
        print("nothing to measure: give wrk connections or --overhead-requests", file=sys.stderr)
        return 2
    if configurations[0].name == configurations[1].name:
        print("the two configurations need different names", file=sys.stderr)
        return 2
    machine = machine_description()
    with tempfile.TemporaryDirectory() as scratch:
        bodies = Path(scratch) / "bodies.jsonl"
        write_wrk_bodies(Workload.from_file(args.data), bodies, args.texts, args.seed)
        runs, overheads = run_pairs(args, configurations, bodies)
    report = {
        "command": "python -m benchmarks.server_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "configurations": [
            {"name": c.name, "settings": c.settings, "source": str(c.source) if c.source else None, **_commit(c.source)}
            for c in configurations
        ],
        "wrk": f"wrk -t1 -cC -d{args.duration}s --latency -s loadtest/wrk_post.lua (after {args.warmup} s of warm-up)",
        "runs": runs,
        "summary": summarize(runs, configurations),
        "overhead_requests": args.overhead_requests,
        "overhead_client": args.overhead_client,
        "overhead_pause_ms": args.overhead_pause_ms,
        "overhead_runs": overheads,
        "overhead": summarize_overhead(overheads, configurations) if overheads else None,
    }
    if args.output:
        write_json(report, args.output)
    print(format_summary(report))
    return 0


def _commit(source: Path | None) -> dict[str, str]:
    """The commit a source tree (None: this checkout) has checked out, and whether it has changes beside it."""
    where = str(source or REPO_ROOT)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit.stdout.strip(), "uncommitted_changes": "yes" if status.stdout.strip() else "no"}


if __name__ == "__main__":
    sys.exit(main())
