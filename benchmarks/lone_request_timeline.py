"""Where a lone request's time goes inside `deebert serve`, step by step: a server whose route, pipeline, batcher,
engine and uvicorn `send` are timestamped, and one client sending texts one at a time on one keep-alive connection.

    python -m benchmarks.lone_request_timeline --checkpoint weights/sst2-minilm-l6 --data ../shared/data/sst2/dev.tsv

The server runs in a child process with its own functions wrapped (nothing in the code changes); at exit it writes
each request's timestamps. The steps are printed in the order they happened (by their median offset from the
route's start), each with the p50 of the time since the step before; uvicorn's writes of the response's head and
body come after X-Total-Time. By default run from this checkout; `--source DIR` serves another tree (a `git
worktree` of an older commit) with this script.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.report import write_json
from loadtest.servers import free_port, server_process
from model.data import read_dataset
from reports.common import describe_machine, machine_description

STEPS = [
    "route",
    "submit_in",
    "runner_in",
    "on_exit",
    "on_exit_done",
    "runner_out",
    "finish_batch",
    "submitted",
    "resumed",
    "headers",
]


def serve_wrapped(report: Path) -> None:
    """`deebert serve` (its settings from the environment) with the request path timestamped; at exit, every
    request's stamps go to `report` as JSON."""
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    import server.batcher as batcher
    import server.engine as engine
    import server.pipeline as pipeline
    import server.routes.classify as classify

    clock = time.perf_counter
    current: dict[str, float] = {}
    requests: list[dict[str, float]] = []

    run_batch = engine.Engine.run_batch

    def timed_run_batch(self: Any, items: Any, thresholds: Any, on_exit: Any, stream: bool = False) -> None:
        current["runner_in"] = clock()

        def timed_exit(row: int, outcome: Any) -> None:
            current["on_exit"] = clock()
            on_exit(row, outcome)
            current["on_exit_done"] = clock()

        run_batch(self, items, thresholds, timed_exit, stream)
        current["runner_out"] = clock()

    finish_batch = batcher.Batcher._finish_batch

    def timed_finish_batch(self: Any, size: int, elapsed: float, beside: int = 0) -> None:
        finish_batch(self, size, elapsed, beside)
        current["finish_batch"] = clock()

    submit, await_answers = pipeline.submit, pipeline.await_answers

    async def timed_submit(*args: Any, **kwargs: Any) -> Any:
        current["submit_in"] = clock()
        submitted = await submit(*args, **kwargs)
        current["submitted"] = clock()
        return submitted

    async def timed_await_answers(*args: Any, **kwargs: Any) -> Any:
        answers = await await_answers(*args, **kwargs)
        current["resumed"] = clock()
        return answers

    headers = classify.headers

    def timed_headers(answer: Any) -> dict[str, str]:
        requests.append({**current, "headers": clock(), "route": answer.started})
        current.clear()
        return headers(answer)

    send = httptools_impl.RequestResponseCycle.send

    async def timed_send(self: Any, message: Any) -> None:
        started = clock()
        await send(self, message)
        if requests and message["type"] in ("http.response.start", "http.response.body"):
            requests[-1][message["type"]] = clock() - started

    engine.Engine.run_batch = timed_run_batch  # type: ignore[method-assign]
    batcher.Batcher._finish_batch = timed_finish_batch  # type: ignore[method-assign]
    pipeline.submit, pipeline.await_answers = timed_submit, timed_await_answers
    classify.headers = timed_headers
    httptools_impl.RequestResponseCycle.send = timed_send  # type: ignore[method-assign]
    atexit.register(lambda: report.write_text(json.dumps(requests)))
    from server.serve import main as serve

    serve([])


def one_at_a_time(port: int, bodies: list[bytes], seconds: float) -> int:
    """Send the bodies in turn, each after the last answer, on one keep-alive connection, for `seconds`."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = connection.makefile("rb")
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = bodies[sent % len(bodies)]
        head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        connection.sendall(head.encode() + b"\r\n\r\n" + body)
        status = reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        reader.read(length)
        sent += 1
    connection.close()
    return sent


def summarize(requests: list[dict[str, float]], skip: int) -> dict[str, Any]:
    """The steps in the order they happened, each with the p50 µs since the one before; the writes' p50 µs."""
    complete = [r for r in requests[skip:] if all(step in r for step in STEPS)]
    order = sorted(STEPS, key=lambda step: statistics.median(r[step] - r["route"] for r in complete))
    steps = [
        {"from": a, "to": b, "p50_us": 1e6 * statistics.median(r[b] - r[a] for r in complete)}
        for a, b in itertools.pairwise(order)
    ]
    writes = {
        kind: 1e6 * statistics.median(r[kind] for r in complete if kind in r)
        for kind in ("http.response.start", "http.response.body")
    }
    return {"requests": len(complete), "steps": steps, "writes_us": writes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--skip", type=int, default=20, help="first requests left out (warm-up)")
    parser.add_argument("--source", type=Path, default=None, help="serve this source tree (default: this one)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--output", type=Path, help="JSON with the steps, the writes and the machine")
    parser.add_argument("--serve-wrapped", type=Path, help=argparse.SUPPRESS)  # the child: write stamps here
    args = parser.parse_args(argv)
    if args.serve_wrapped:
        serve_wrapped(args.serve_wrapped)
        return 0
    source = (args.source or Path.cwd()).resolve()
    port = free_port()
    stamps = Path(f"/tmp/deebert-timeline-{os.getpid()}.json")
    # The server's settings: this process's DEEBERT_* (the defaults where unset), its checkpoint and port.
    env = {key: value for key, value in os.environ.items() if key.startswith("DEEBERT_")}
    env |= {"DEEBERT_CHECKPOINT": str(Path(args.checkpoint).resolve()), "DEEBERT_PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join([str(source), str(Path(__file__).resolve().parents[1])])
    # By its path, not `-m`: run in another tree, `benchmarks` would be that tree's package, without this script.
    child = [sys.executable, str(Path(__file__).resolve()), "--serve-wrapped", str(stamps)]
    log = stamps.with_suffix(".log")  # the server's log, kept when it does not start
    with server_process(child, env, port, args.startup_timeout, log_path=log, source=source):
        data = read_dataset(args.data)
        bodies = [json.dumps({"text": text}).encode() for text in data.texts]
        sent = one_at_a_time(port, bodies, args.seconds)
    summary = summarize(json.loads(stamps.read_text()), args.skip)
    stamps.unlink()
    log.unlink()
    machine = machine_description()
    print(describe_machine(machine))
    print(f"{sent} requests one at a time; p50 µs from each step to the next ({summary['requests']} counted):")
    for step in summary["steps"]:
        print(f"  {step['from']:>13} -> {step['to']:<13} {step['p50_us']:8.1f}")
    for kind, value in summary["writes_us"].items():
        print(f"  uvicorn's send of {kind}: {value:.1f}")
    if args.output:
        # Imported here: the child runs in `--source`'s tree, whose `benchmarks` package may predate this module.
        from benchmarks.engine_runs import module_command

        command = module_command("lone_request_timeline", argv)
        write_json({"command": command, "machine": machine, "source": str(source), **summary}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
