"""The one request pipeline both APIs share: decode → resolve threshold → submit → await → encode.

Each API's route decodes its own body into a `Job` (schemas) and encodes the `Answer` in its own shape;
between them, `answer` runs the shared steps, each a small function here:

    resolve_threshold  the body's threshold, else the header's, else the server default now (the controller's)
    submit             limits, tokenization (before the queue), brownout, into the batcher
    await_answers      every text's answer, or the client's disconnect
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request

from server.batcher import Batcher, RowAnswer
from server.engine import Engine, RowOutcome, Threshold, TruncationSide
from server.errors import DeeBertError, ErrorType
from server.protocol import DEGRADED_HEADER, EXIT_LAYER_HEADER, LAYERS_EXECUTED_HEADER, THRESHOLD_HEADER
from server.state import ServerState

# Requests with more text than this are tokenized in a worker thread; short ones inline (a thread hop
# costs more than tokenizing them).
OFF_LOOP_TOKENIZE_CHARS = 20_000
# A request still unanswered after this long starts watching for its client's disconnect.
WATCH_DISCONNECT_AFTER_S = 0.02


@dataclass(frozen=True)
class Job:
    """A decoded request, whichever API it came in: texts (and pairs) and how to answer them."""

    texts: list[str]
    pairs: list[str] | None
    body_threshold: float | int | str | None = None
    header_threshold: str | None = None
    truncate: bool = True
    truncation_side: TruncationSide | None = None  # None: the tokenizer's own (right)

    @property
    def characters(self) -> int:
        """Characters (code points) in the texts and pairs."""
        return sum(map(len, self.texts)) + (sum(map(len, self.pairs)) if self.pairs else 0)


@dataclass(frozen=True)
class Submitted:
    """A job's texts in the batcher's queue."""

    futures: list[asyncio.Future[RowAnswer]]
    threshold: Threshold  # the one applied: under brownout, an unpinned request gets the ceiling
    degraded: bool
    tokens: int
    tokenization_s: float


@dataclass(frozen=True)
class Answer:
    """Every text's outcome, in input order, and where the request's time went."""

    outcomes: list[RowOutcome]
    threshold: Threshold
    degraded: bool
    characters: int
    tokens: int
    tokenization_s: float
    queue_s: list[float]  # per text: from queueing to its batch's start
    inference_s: list[float]  # per text: from its batch's start to its exit
    started: float  # time.perf_counter() when the route began

    @property
    def exit_layer(self) -> int:
        """The deepest exit among the texts."""
        return max(o.exit_layer for o in self.outcomes)

    @property
    def layers_executed(self) -> int:
        """Σ exit layer over the texts."""
        return sum(o.exit_layer for o in self.outcomes)

    def total_s(self) -> float:
        """Seconds since the route began."""
        return time.perf_counter() - self.started


async def answer(state: ServerState, request: Request, job: Job, started: float) -> Answer:
    """Run a decoded job through the shared steps and wait for every text's answer."""
    engine, batcher = state.serving()
    threshold, pinned = resolve_threshold(
        engine, job.body_threshold, job.header_threshold, state.default_threshold(engine)
    )
    submitted = await submit(state, engine, batcher, job, threshold, pinned)
    answers = await await_answers(request, submitted.futures)
    if submitted.degraded and state.metrics is not None:
        state.metrics.record_degraded()
    if state.controller is not None:
        state.controller.record_latency(time.perf_counter() - started)
    return Answer(
        outcomes=[a.value for a in answers],
        threshold=submitted.threshold,
        degraded=submitted.degraded,
        characters=job.characters,
        tokens=submitted.tokens,
        tokenization_s=submitted.tokenization_s,
        queue_s=[a.queue_s for a in answers],
        inference_s=[a.compute_s for a in answers],
        started=started,
    )


def resolve_threshold(
    engine: Engine, body_value: float | int | str | None, header_value: str | None, default: Threshold
) -> tuple[Threshold, bool]:
    """The threshold to run at, and whether the request pinned it: the body's wins over the header's; with
    neither, the server's default now (unpinned: the controller moves it, brownout may raise it). 422 naming
    the source otherwise."""
    if body_value is not None:
        return engine.resolve_threshold(body_value, "body threshold"), True
    if header_value is not None:
        return engine.resolve_threshold(header_value, f"{THRESHOLD_HEADER} header"), True
    return default, False


async def submit(
    state: ServerState, engine: Engine, batcher: Batcher, job: Job, threshold: Threshold, pinned: bool
) -> Submitted:
    """Check the limits, tokenize, apply brownout, and queue every text (all or none)."""
    limit = state.settings.max_texts_per_request
    if len(job.texts) > limit:
        raise DeeBertError(ErrorType.TOO_MANY_TEXTS, f"{len(job.texts)} texts in one request; the maximum is {limit}")
    batcher.check_room(len(job.texts))  # refuse before tokenizing: under overload a 429 must be cheap
    tokenizing = time.perf_counter()
    if job.characters > OFF_LOOP_TOKENIZE_CHARS:
        # Long inputs take the tokenizer (which releases the GIL) hundreds of ms: not on the event loop.
        encoded = await engine.tokenize_off_loop(job.texts, job.pairs, job.truncate, job.truncation_side)
    else:
        encoded = engine.tokenize(job.texts, job.pairs, job.truncate, job.truncation_side)
    tokenization_s = time.perf_counter() - tokenizing
    degraded = None
    if state.brownout is not None:
        degraded = state.brownout.threshold_for(pinned, batcher.queue_wait_s, drained=not batcher.busy)
        if degraded is not None and not engine.exits_earlier(degraded, threshold):
            degraded = None  # the controller's default already exits as early
    applied = degraded if degraded is not None else threshold
    futures = batcher.submit(encoded, [applied.value] * len(encoded))
    return Submitted(futures, applied, degraded is not None, sum(map(len, encoded)), tokenization_s)


async def await_answers(request: Request, futures: list[asyncio.Future[RowAnswer]]) -> list[RowAnswer]:
    """Wait for every row's answer; if the client disconnects first, cancel its rows (batch-mates go on).

    The rows are awaited directly, in order: a request wakes as soon as its first row is answered (its
    batch-mates are then mostly done too), with no gathering future between (each costs the request a turn
    of the event loop). Most answers come within a batch's time, so the disconnect watch (a task reading the
    connection) starts only once a request has waited `WATCH_DISCONNECT_AFTER_S`: a client that leaves sooner
    costs at most the rows it had queued, and a prompt answer costs no task."""
    if all(future.done() for future in futures):  # answered at once (a lone text run in its own turn): no watch
        return [future.result() for future in futures]
    loop = asyncio.get_running_loop()
    client_left = False
    watcher: asyncio.Task[None] | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = loop.create_task(_disconnected(request))
        watcher.add_done_callback(on_disconnect)

    def on_disconnect(task: asyncio.Task[None]) -> None:
        nonlocal client_left
        if task.cancelled() or all(future.done() for future in futures):
            return
        client_left = True
        for future in futures:
            future.cancel()

    timer = loop.call_later(WATCH_DISCONNECT_AFTER_S, watch)
    try:
        return [await future for future in futures]
    except BaseException as error:
        # The client left, a row failed, or this request was cancelled: its rows still queued are dropped.
        for future in futures:
            future.cancel()
        if client_left and isinstance(error, asyncio.CancelledError):
            raise DeeBertError(ErrorType.CLIENT_CLOSED_REQUEST, "the client disconnected before its answer") from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def early_exit_headers(answer: Answer) -> dict[str, str]:
    """What early exit did, for either API: the deepest exit layer, Σ exit layers, and brownout."""
    headers = {EXIT_LAYER_HEADER: str(answer.exit_layer), LAYERS_EXECUTED_HEADER: str(answer.layers_executed)}
    if answer.degraded:
        headers[DEGRADED_HEADER] = "true"
    return headers
