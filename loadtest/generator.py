"""`deebert loadtest`: an async HTTP load generator for `POST /v1/classify`.

Two ways to offer load:

- **open loop** (`--rate R`): requests arrive as a Poisson process at R per second, each fired as its own
  task at its scheduled time, so a slow server cannot slow the arrivals down (the mistake of closed-loop
  tools that hides queueing). Latency is measured from the *scheduled* arrival, so any lag of the
  generator itself counts against the result instead of being silently omitted.
- **closed loop** (`--concurrency N`): N clients, each sending its next request as soon as the last one
  is answered: the way to find the most a server can do.

Texts come from a data file (seeded random draws); the threshold of each request comes from a weighted
mix (`"0:0.5,balanced:0.3,fast:0.2"`) and travels in the `X-Exit-Threshold` header. `/metrics` is
scraped before and after the run, so the expected saving computed from the responses can be checked
against the server's own counters.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypedDict

import httpx

from loadtest.records import (
    RequestRecord,
    RunResult,
    Sample,
    parse_metrics,
)
from loadtest.report import build_report, format_report, write_json
from server.protocol import (
    CLASSIFY_PATH,
    COMPUTE_TIME_HEADER,
    METRICS_PATH,
    MODEL_PATH,
    QUEUE_TIME_HEADER,
    THRESHOLD_HEADER,
    TOKENIZATION_TIME_HEADER,
    TOTAL_TIME_HEADER,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_IN_FLIGHT = 2000

_PRESET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")


# --- pure pieces ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdMix:
    """Thresholds to send (header values: a number or a preset name) and the probability of each."""

    values: tuple[str, ...]
    weights: tuple[float, ...]
    spec: str

    def pick(self, rng: random.Random) -> str:
        """One threshold, drawn by weight."""
        if len(self.values) == 1:
            return self.values[0]
        return rng.choices(self.values, weights=self.weights)[0]


def parse_threshold_mix(spec: str) -> ThresholdMix:
    """Parse `"0"`, `"balanced"` or a weighted mix `"0:0.5,balanced:0.3,fast:0.2"` (weights are normalized).

    A part without a weight weighs 1, so `"0,fast"` is half and half. Raises ValueError naming the bad part.
    """
    if not spec or not spec.strip():
        raise ValueError("empty threshold spec; give a number >= 0, a preset name, or a mix like '0:0.5,fast:0.5'")
    values: list[str] = []
    weights: list[float] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise ValueError(f"threshold spec {spec!r} has an empty part (a stray comma?)")
        value, sep, weight_text = part.partition(":")
        value = value.strip()
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(
                    f"threshold spec part {part!r}: weight {weight_text.strip()!r} is not a number"
                ) from None
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"threshold spec part {part!r}: weight must be a number > 0")
        values.append(_threshold_value(value, part))
        weights.append(weight)
    if len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"threshold spec {spec!r} names {repeated} more than once")
    total = sum(weights)
    return ThresholdMix(tuple(values), tuple(w / total for w in weights), spec.strip())


def _threshold_value(value: str, part: str) -> str:
    try:
        number = float(value)
    except ValueError:
        if not _PRESET_NAME.match(value):
            raise ValueError(
                f"threshold spec part {part!r}: {value!r} is neither a number >= 0 nor a preset name"
            ) from None
        return value
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"threshold spec part {part!r}: a threshold must be a finite number >= 0, got {value}")
    return value


def poisson_schedule(
    rate: float, rng: random.Random, count: int | None = None, duration: float | None = None
) -> list[float]:
    """Arrival offsets (s from the start) of a Poisson process at `rate`/s, until `count` arrivals or `duration`."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0, got {rate}")
    if count is None and duration is None:
        raise ValueError("a schedule needs a request count, a duration, or both")
    offsets: list[float] = []
    now = 0.0
    while count is None or len(offsets) < count:
        now += rng.expovariate(rate)
        if duration is not None and now >= duration:
            break
        offsets.append(now)
    return offsets


def error_key(err: BaseException) -> str:
    """An exception as an error-count key: httpx.ConnectError -> 'connect_error', ReadTimeout -> 'read_timeout'."""
    return _CAMEL_BOUNDARY.sub("_", type(err).__name__).lower()


# --- workload ------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Texts (and second texts of pairs) to draw requests from."""

    texts: list[str]
    text_pairs: list[str] | None = None
    source: str = "inline"

    @classmethod
    def from_file(cls, path: str | Path) -> Workload:
        """Read a TSV/CSV/JSONL data file (labels optional) with the project's own reader."""
        from model.data import read_dataset

        data = read_dataset(path, require_labels=False)
        return cls(data.texts, data.text_pairs, str(path))

    def body(self, rng: random.Random, k: int) -> dict[str, list[str]]:
        """A `/v1/classify` body of k texts drawn with replacement."""
        picks = [rng.randrange(len(self.texts)) for _ in range(k)]
        body = {"texts": [self.texts[i] for i in picks]}
        if self.text_pairs is not None:
            body["text_pairs"] = [self.text_pairs[i] for i in picks]
        return body


# --- running -------------------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    """One load-generator run. Open loop when `rate` is set, else closed loop with `concurrency` clients."""

    url: str = DEFAULT_URL
    rate: float | None = None
    concurrency: int = 1
    requests: int | None = None
    duration: float | None = 10.0
    threshold: str | None = None
    texts_per_request: int = 1
    seed: int = 0
    timeout: float = 30.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    warmup: int = 0
    progress: bool = True
    label: str = ""
    api_key: str | None = None
    # httpx, or the light raw HTTP/1.1 client (loadtest/rawhttp.py) for offering more than the server takes.
    http_client: Literal["httpx", "raw"] = "httpx"

    @property
    def mode(self) -> Literal["open", "closed"]:
        return "open" if self.rate is not None else "closed"

    def validate(self) -> None:
        """Raise ValueError on settings that cannot run."""
        if self.requests is None and self.duration is None:
            raise ValueError("give --requests, --duration, or both; the run must end by itself")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"--duration must be > 0, got {self.duration}")
        if self.rate is not None and (not self.rate > 0 or not math.isfinite(self.rate)):
            raise ValueError(f"--rate must be > 0, got {self.rate}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.texts_per_request < 1:
            raise ValueError(f"--texts-per-request must be >= 1, got {self.texts_per_request}")
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.threshold is not None:
            parse_threshold_mix(self.threshold)
        if self.http_client not in ("httpx", "raw"):
            raise ValueError(f"--http-client must be httpx or raw, got {self.http_client!r}")


class PostResponse(Protocol):
    status_code: int

    @property
    def headers(self) -> httpx.Headers: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class PostClient(Protocol):
    """What sends the measured requests: an httpx.AsyncClient or a loadtest.rawhttp.RawClient."""

    async def post(self, url: str, *, json: Any, headers: dict[str, str]) -> Any: ...


class HasHeaders(Protocol):
    @property
    def headers(self) -> Any: ...  # httpx.Headers, http.client.HTTPMessage: a case-insensitive `get`


class TimingHeaders(TypedDict):
    total_ms: float | None
    compute_ms: float | None
    queue_ms: float | None
    tokenization_ms: float | None


def timing_headers(response: HasHeaders) -> TimingHeaders:
    """The server's timing headers (ms) as `RequestRecord` fields; None where one is missing or not a number."""
    return TimingHeaders(
        total_ms=_header_ms(response, TOTAL_TIME_HEADER),
        compute_ms=_header_ms(response, COMPUTE_TIME_HEADER),
        queue_ms=_header_ms(response, QUEUE_TIME_HEADER),
        tokenization_ms=_header_ms(response, TOKENIZATION_TIME_HEADER),
    )


def _header_ms(response: HasHeaders, name: str) -> float | None:
    value = response.headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def _post(client: PostClient, body: dict[str, list[str]], threshold: str | None, started: float) -> RequestRecord:
    """Send one request; latency counts from `started` (the scheduled arrival in open loop)."""
    headers = {THRESHOLD_HEADER: threshold} if threshold is not None else {}
    texts = len(body["texts"])
    try:
        response: PostResponse = await client.post(CLASSIFY_PATH, json=body, headers=headers)
    except httpx.HTTPError as err:
        return RequestRecord(
            error_key(err), time.perf_counter() - started, texts, threshold, error_detail=str(err), sent_at=started
        )
    latency = time.perf_counter() - started
    record = RequestRecord(
        str(response.status_code),
        latency,
        texts,
        threshold,
        **timing_headers(response),
        sent_at=started,
    )
    if response.status_code != 200:
        record.error_detail = response.text[:300]
        record.retry_after = response.headers.get("Retry-After")
        return record
    try:
        payload = response.json()
        record.exit_layers = [int(r["exit_layer"]) for r in payload["results"]]
        record.num_layers = int(payload["num_layers"])
    except (ValueError, KeyError, TypeError) as err:
        record.status, record.error_detail = "bad_response", f"{type(err).__name__}: {err}"
    return record


async def scrape_metrics(client: httpx.AsyncClient) -> list[Sample] | None:
    """The server's /metrics samples, or None where it has no such page (a baseline) or is unreachable."""
    try:
        response = await client.get(METRICS_PATH)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_metrics(response.text)


async def fetch_model_info(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """GET /v1/model (labels, layers, presets), or None when the server does not answer it."""
    try:
        response = await client.get(MODEL_PATH)
        info = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class _Plan:
    """Request i's body and threshold, drawn in sending order from the seed: the same run sends the same texts."""

    def __init__(self, config: LoadConfig, workload: Workload) -> None:
        # Separate streams, so that e.g. a new threshold mix does not change which texts are drawn.
        self._texts = random.Random(config.seed)
        self._thresholds = random.Random(config.seed + 1_000_003)
        self._mix = parse_threshold_mix(config.threshold) if config.threshold is not None else None
        self._workload = workload
        self._k = config.texts_per_request

    def next(self) -> tuple[dict[str, list[str]], str | None]:
        body = self._workload.body(self._texts, self._k)
        return body, self._mix.pick(self._thresholds) if self._mix is not None else None


def _progress_bar(config: LoadConfig) -> Any:
    from tqdm import tqdm

    total = config.requests
    if config.rate is not None and config.duration is not None:
        expected = int(config.rate * config.duration)
        total = min(total, expected) if total is not None else expected
    name = config.label or (f"open {config.rate:g}/s" if config.rate is not None else f"closed x{config.concurrency}")
    return tqdm(total=total, unit="req", desc=name, disable=not config.progress, leave=False, file=sys.stderr)


async def _open_loop(
    client: PostClient, config: LoadConfig, plan: _Plan, bar: Any
) -> tuple[list[RequestRecord], int, float, float]:
    assert config.rate is not None
    schedule = poisson_schedule(config.rate, random.Random(config.seed + 2_000_003), config.requests, config.duration)
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[None]] = set()
    dropped = 0
    max_lag = 0.0

    async def fire(body: dict[str, list[str]], threshold: str | None, arrival: float) -> None:
        record = await _post(client, body, threshold, arrival)
        records.append(record)
        bar.update(1)

    start = time.perf_counter()
    for offset in schedule:
        arrival = start + offset
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - arrival)
        body, threshold = plan.next()
        if len(in_flight) >= config.max_in_flight:
            # The client itself is the bottleneck now; counting the arrival keeps the offered rate honest.
            dropped += 1
            bar.update(1)
            continue
        task = asyncio.create_task(fire(body, threshold, arrival))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    return records, dropped, max_lag, schedule[-1] if schedule else 0.0


async def _closed_loop(
    client: PostClient, config: LoadConfig, plan: _Plan, bar: Any
) -> tuple[list[RequestRecord], int, float, float]:
    records: list[RequestRecord] = []
    start = time.perf_counter()
    deadline = start + config.duration if config.duration is not None else math.inf
    sent = 0

    async def client_loop() -> None:
        nonlocal sent
        while (config.requests is None or sent < config.requests) and time.perf_counter() < deadline:
            sent += 1
            body, threshold = plan.next()
            records.append(await _post(client, body, threshold, time.perf_counter()))
            bar.update(1)

    await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
    return records, 0, 0.0, 0.0


async def run_load(config: LoadConfig, workload: Workload) -> RunResult:
    """Run the load described by `config` against `config.url` and return the raw result."""
    config.validate()
    if not workload.texts:
        raise ValueError("the workload has no texts")
    connections = config.max_in_flight if config.mode == "open" else config.concurrency
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(config.timeout)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    async with httpx.AsyncClient(base_url=config.url, timeout=timeout, limits=limits, headers=headers) as client:
        model_info = await fetch_model_info(client)
        warm = _Plan(replace(config, seed=config.seed + 3_000_017), workload)
        for _ in range(config.warmup):
            body, threshold = warm.next()
            await _post(client, body, threshold, time.perf_counter())
        # Scraped after the warm-up, so the counters' difference covers exactly the measured requests.
        before = await scrape_metrics(client)
        plan = _Plan(config, workload)
        bar = _progress_bar(config)
        sender: PostClient = client
        if config.http_client == "raw":
            from loadtest.rawhttp import RawClient

            auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
            sender = raw = RawClient(config.url, config.timeout, connections, auth)
        started = time.perf_counter()
        try:
            runner = _open_loop if config.mode == "open" else _closed_loop
            records, dropped, lag, span = await runner(sender, config, plan, bar)
        finally:
            bar.close()
            if config.http_client == "raw":
                await raw.aclose()
        elapsed = time.perf_counter() - started
        after = await scrape_metrics(client) if before is not None else None
    return RunResult(config, records, elapsed, dropped, lag, span, before, after, model_info)


def run(config: LoadConfig, workload: Workload) -> dict[str, Any]:
    """Run the load (blocking) and return the report dictionary (see `loadtest.report.build_report`)."""
    return build_report(asyncio.run(run_load(config, workload)))


# --- command line --------------------------------------------------------------------------------------


def _threshold_arg(value: str) -> str:
    try:
        parse_threshold_mix(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `deebert loadtest`."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    parser.add_argument("--data", required=True, help="texts to send: TSV/CSV/JSONL, labels optional")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    loop.add_argument("--concurrency", type=int, default=1, help="closed loop: clients sending back to back")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--duration", type=float, default=10.0, help="stop sending after this many seconds")
    parser.add_argument(
        "--threshold",
        type=_threshold_arg,
        help="X-Exit-Threshold per request: a number, a preset name, or a mix like '0:0.5,balanced:0.3,fast:0.2' "
        "(default: send none, the server's default applies)",
    )
    parser.add_argument("--texts-per-request", type=int, default=1, help="texts in each request")
    parser.add_argument("--seed", type=int, default=0, help="seed for texts, thresholds and arrival times")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="open loop: most outstanding requests; arrivals beyond are counted as dropped_by_client",
    )
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first, one at a time")
    parser.add_argument(
        "--http-client",
        choices=["httpx", "raw"],
        default="httpx",
        help="raw: a minimal HTTP/1.1 client, far less CPU per request, to offer more load than the server takes",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DEEBERT_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $DEEBERT_API_KEY, if set)",
    )
    parser.add_argument("--json", dest="json_out", help="write the report as JSON to this file")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the parsed flags describe."""
    return LoadConfig(
        url=args.url,
        rate=args.rate,
        concurrency=args.concurrency,
        requests=args.requests,
        duration=args.duration,
        threshold=args.threshold,
        texts_per_request=args.texts_per_request,
        seed=args.seed,
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        warmup=args.warmup,
        progress=args.progress,
        api_key=args.api_key,
        http_client=args.http_client,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run `deebert loadtest`: print the table, write the JSON; exit 1 when no request succeeded."""
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as err:
        print(f"deebert loadtest: error: {err}", file=sys.stderr)
        return 2
    report = run(config, Workload.from_file(args.data))
    print(format_report(report))
    if args.json_out:
        write_json(report, Path(args.json_out))
        print(f"wrote {args.json_out}")
    return 0 if report["requests_ok"] > 0 else 1
