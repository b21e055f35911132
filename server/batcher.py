"""Dynamic batching: one task owns a bounded queue of tokenized texts and feeds batches to a runner.

No web framework and no model here: the runner is any function that takes the batch's items and
thresholds and reports each row as it finishes (`on_exit`), from a worker thread. Rows are answered
the moment the runner reports them, not when their batch ends.

Batches can run on the event loop itself instead of on the worker thread (`loop_batches`):

- `alone` (the server's default): a text alone in the server (a batch of one, nothing else queued, the last batch
  one text too, and `in_flight()` says no other request is in flight) runs there when batches of one recently
  took at most `ALONE_MAX_S`: without the crossings to the worker thread and back, a batch-1 request's queueing
  fell by 0.025-0.06 ms of its ~0.3-0.5 ms overhead (BENCHMARKS.md §11), and no other request needs the loop.
  Such a text runs inside `submit` itself, in its request's turn of the loop, without waking the batcher's task
  (`_runs_at_once`; with `all` too, when no other request is in flight).
- `all`: every batch runs there while batches of its kind (one text, or more) recently took at most
  `LOOP_BATCH_MAX_S`. On a CPU whose cores the model's own threads fill, the loop's HTTP work beside a batch only
  competes with it (for the cores, and for the GIL the model's thread needs between runtime calls): served at
  32 and 4 connections it did a median 1.09x and 1.26x the requests/s of `alone` on an AMD EPYC, but 1.00x and
  0.89x on an Intel Xeon with AMX, whose shorter batches leave the serialized HTTP work a larger share
  (BENCHMARKS.md §12, noisy pairs). Before such a batch the loop gets a few turns to queue the requests it
  has accepted and not queued yet, so that a wave of requests makes one batch. The cost: while a batch holds
  the loop, arriving requests wait unread instead of in the queue, so the queue's wait and depth understate the
  load. (After such a batch the batcher counts as busy until those requests have had their turns to be queued,
  so that brownout, which ends when the queue drains, does not end after every batch; the time they waited
  unread is in no figure.)
- `none`: every batch on the worker thread.

The first batch of each kind, and any while the worker thread has another job, runs on the worker thread.

Batch streams (`streams` > 1, with a `stream_runner`): under load, up to `streams` batches run at once, each on a
thread of its own with the stream runner (the model's copy on a share of the CPU's threads); a batch runs on the
worker thread with the whole model, alone, when nothing waits behind it and no stream is running. On a CPU with
few cores, one batch on all threads loses time at each operation's join, where the threads wait for the slowest
(and one of them is often preempted by the event loop's HTTP work); batches side by side on one thread each do
not wait for each other (BENCHMARKS.md §28). A lone text keeps all the threads: it has no batch to run beside.

After the last batch of a busy spell (nothing queued or running, no request in flight), `on_quiet` runs on the
event loop, after the answers have gone out (`run_if_quiet`, which the server also calls as each inference request
ends: a fast client's next request can arrive within a few turns of the loop): the server re-warms the tokenizer
there. A forward pass streams the model's weights through the CPU's caches, so the next request would tokenize
with cold caches (~0.15 ms instead of ~0.04 for an SST-2 sentence on an AVX2-only AMD EPYC); tokenizing a short
text while the server waits anyway brought that request's tokenizing down to ~0.09 ms (BENCHMARKS.md §25). It helps
a request that comes within a few milliseconds of the last answer; after 20 ms or more the caches are cold again.

A second, low-priority queue (`submit_idle`) holds background items for `idle_runner` (shadow
full-depth runs): they go to the same worker thread only while no text waits, so they never hold an
answer back by more than one idle chunk, and under sustained load they are simply refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from server.errors import DeeBertError, ErrorType

logger = logging.getLogger("deebert.batcher")


# The longest a batch of one may recently have taken for a lone text to run on the event loop (`alone`), and
# batches of a kind for them to run there (`all`): a batch there holds the loop (new connections, health
# checks) for its length.
ALONE_MAX_S = 0.010
LOOP_BATCH_MAX_S = 0.25
LoopBatches = Literal["none", "alone", "all"]
# At most this many turns of the loop let accepted requests join the queue before a batch that will hold it.
ARRIVAL_TURNS_MAX = 64


class Sized(Protocol):
    def __len__(self) -> int: ...


# runner(items, thresholds, on_exit): runs one batch; calls on_exit(row_index, value) as rows finish.
Runner = Callable[[list[Any], list[float], Callable[[int, Any], None]], None]
# idle_runner(items): background work on the worker thread, only while no text waits.
IdleRunner = Callable[[list[Any]], None]


@dataclass
class RowAnswer:
    """What a row's future resolves to: the runner's value and where the time went."""

    value: Any
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)
class Row:
    item: Sized
    threshold: float
    future: asyncio.Future[RowAnswer]
    enqueued_at: float
    started_at: float = 0.0
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.item)


class WorkerThread:
    """The one thread that runs batches (and warm-up and idle work), fed through a queue and answering through
    the event loop.

    A request crosses to it and back once: with `loop.run_in_executor` on a one-thread pool those crossings
    cost ~41 + 22 µs at the median on a 2-core VM, here ~15 + 15 µs (the pool's futures, their chaining and its
    lock are what the difference is). Started on first use; `shutdown` lets the running job finish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.pending = 0  # jobs handed to the thread and not yet settled on the loop

    async def run(self, function: Callable[[], Any]) -> Any:
        """`function()` on the thread; its value or its exception here. Cancelling the caller does not stop a
        job that has started (as with an executor); its answer is then dropped."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending += 1
        self._jobs.put((function, done))
        return await done

    def shutdown(self) -> None:
        """Finish the job in hand, then end the thread (waits for it)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, done = job
            try:
                value, error = function(), None
            except BaseException as err:  # handed to the awaiting coroutine, as an executor would
                value, error = None, err
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop has closed, nobody waits for this
                done.get_loop().call_soon_threadsafe(self._settle, done, value, error)

    def _settle(self, done: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        self.pending -= 1
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)


def _call_now(function: Callable[..., Any], *args: Any) -> None:
    function(*args)


def _moving_average(previous: float | None, value: float) -> float:
    """The batcher's recent figures: a fifth of each new value (the value itself at first)."""
    return value if previous is None else 0.8 * previous + 0.2 * value


class Batcher:
    """A bounded queue plus the one loop that turns it into batches."""

    def __init__(
        self,
        runner: Runner,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        on_depth: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_answer: Callable[[Row, RowAnswer], None] | None = None,
        idle_runner: IdleRunner | None = None,
        max_idle_items: int = 256,
        idle_chunk_size: int = 8,
        loop_batches: LoopBatches = "none",
        in_flight: Callable[[], int] = lambda: 0,
        alone_max_s: float = ALONE_MAX_S,
        loop_max_s: float = LOOP_BATCH_MAX_S,
        on_quiet: Callable[[], None] | None = None,
        stream_runner: Runner | None = None,
        streams: int = 1,
    ) -> None:
        """`on_answer(row, answer)`: called on the event loop just after each text's answer is handed over.
        `loop_batches`: which batches run on the event loop (see the module's docstring), while batches of one
        take at most `alone_max_s` (`alone`) or batches of their kind at most `loop_max_s` (`all`);
        `in_flight()`: requests in the server now (accepted by the HTTP server, their tasks started or not;
        queued, being read or tokenized, or being answered): a burst's requests must count before their tasks run,
        or each would run alone (`server.state.requests_in_flight`). `on_quiet()`: called on the event loop once
        per busy spell, after its last batch, when its answers are out and no request is in flight
        (`run_if_quiet`). `stream_runner`, `streams`: under load, up to `streams` batches at once on the stream
        runner (see the module's docstring); 1 (or no stream runner): one batch at a time."""
        self._runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._on_depth = on_depth or (lambda depth: None)
        self._on_batch = on_batch or (lambda size: None)
        self._on_answer = on_answer or (lambda row, answer: None)
        self._queue: list[Row] = []
        self._wakeup = asyncio.Event()
        self._worker = WorkerThread("deebert-batch")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running_rows = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._rows_per_s = 0.0
        self._last_wait_s = 0.0
        self.batches_taken = 0  # ever; tells idle-time housekeeping whether work happened since it last ran
        self._idle_runner = idle_runner
        self.max_idle_items = max_idle_items
        self.idle_chunk_size = idle_chunk_size
        self._idle_items: list[Any] = []
        self.loop_batches = loop_batches
        self._in_flight = in_flight
        self.alone_max_s = alone_max_s
        self.loop_max_s = loop_max_s
        self._last_batch_size = 0
        # Recent time of a batch of one (False) and of more texts (True): moving averages, once measured.
        self._recent_s: dict[bool, float] = {}
        # A batch just held the event loop (`all`), and the requests that arrived meanwhile, unread until it
        # ended, have not all had their turns to be queued yet.
        self._arrivals_unsettled = False
        self._on_quiet = on_quiet
        self._quiet_done_at = 0  # `batches_taken` when `on_quiet` last ran
        self._stream_runner = stream_runner
        self.streams = streams if stream_runner is not None and streams > 1 else 1
        self._stream_workers = (
            [WorkerThread(f"deebert-stream-{n}") for n in range(1, self.streams + 1)] if self.streams > 1 else []
        )
        self._free_streams = list(reversed(self._stream_workers))
        self._stream_freed = asyncio.Event()
        self._stream_tasks: set[asyncio.Task[None]] = set()

    # --- producer side ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Texts waiting for a batch."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Texts queued or running, or a batch just held the event loop and the requests that arrived during it
        may not be queued yet (so that brownout does not see a drained queue after every such batch)."""
        return bool(self._queue) or self._running_rows > 0 or self._arrivals_unsettled

    @property
    def queue_wait_s(self) -> float:
        """How long texts wait now: the longest wait in the last batch taken, or the oldest waiting text's age
        if longer; 0 once the queue has drained (nothing queued or running)."""
        if not self.busy:
            return 0.0
        oldest = time.perf_counter() - self._queue[0].enqueued_at if self._queue else 0.0
        return max(self._last_wait_s, oldest)

    @property
    def idle_depth(self) -> int:
        """Background items waiting for an idle moment."""
        return len(self._idle_items)

    def submit_idle(self, items: Sequence[Any]) -> bool:
        """Queue background items for `idle_runner` (all or none); False when that queue is full or closed."""
        if self._idle_runner is None or self._closed or len(self._idle_items) + len(items) > self.max_idle_items:
            return False
        self._idle_items.extend(items)
        self._wakeup.set()
        return True

    def check_room(self, count: int) -> None:
        """503 while draining, 429 (with Retry-After) when `count` more texts would overflow the queue.

        `submit` checks it; the app also checks it before tokenizing, so that under overload a refusal
        costs the event loop almost nothing and the accepted requests keep its time."""
        if self._closed:
            raise DeeBertError(ErrorType.SHUTTING_DOWN, "the server is shutting down; retry on another replica")
        if len(self._queue) + count > self.max_queue_size:
            raise DeeBertError(
                ErrorType.OVERLOADED,
                f"queue full ({len(self._queue)} of {self.max_queue_size} texts waiting); retry later",
                headers={"Retry-After": str(self.retry_after_s(count))},
            )

    def submit(self, items: Sequence[Sized], thresholds: Sequence[float]) -> list[asyncio.Future[RowAnswer]]:
        """Queue a request's texts (all or none); 429 when the queue cannot take them all. A lone text that would
        run on the event loop anyway runs here at once (`_runs_at_once`): its future is done on return."""
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        rows = [
            Row(item, threshold, loop.create_future(), now) for item, threshold in zip(items, thresholds, strict=True)
        ]
        if self._runs_at_once(rows):
            self.batches_taken += 1
            self._run_here(rows)  # answered before this returns: its request awaits a future already done
            return [rows[0].future]
        for row in rows:
            row.future.add_done_callback(functools.partial(self._forget_if_cancelled, row))
        self._queue.extend(rows)
        self._idle.clear()
        self._on_depth(len(self._queue))
        self._wakeup.set()
        return [row.future for row in rows]

    @property
    def streams_running(self) -> int:
        """Batches running on streams now."""
        return len(self._stream_workers) - len(self._free_streams)

    def _finish_batch(self, size: int, elapsed: float, beside: int = 0) -> None:
        """Bookkeeping after a batch of `size` texts ran for `elapsed` seconds (any path), `beside` other batches
        running on streams when it started."""
        self._running_rows -= size
        self._last_batch_size = size
        if not beside:  # a batch's own time: not one that shared the CPU with others
            self._recent_s[size > 1] = _moving_average(self._recent_s.get(size > 1), elapsed)
        if elapsed > 0:
            self._rows_per_s = _moving_average(self._rows_per_s or None, size / elapsed * (1 + beside))
        self._update_idle()
        if self._on_quiet is not None:
            # A turn on: the answered requests' tasks have ended by then (a batch on the worker thread).
            asyncio.get_running_loop().call_soon(self.run_if_quiet)

    def run_if_quiet(self, requests_of_caller: int = 0) -> None:
        """`on_quiet()`, once per busy spell: when nothing is queued or running, no request is in flight but
        `requests_of_caller` (a request that has just sent its answer still counts itself), and it has not run since
        the last batch was taken. The server calls this as each inference request ends, and the batcher a turn after
        each batch (a batch on the worker thread ends after its requests have)."""
        if (
            self._on_quiet is None
            or self._quiet_done_at == self.batches_taken
            or self.busy
            or self._closed
            or self._in_flight() > requests_of_caller
        ):
            return
        self._quiet_done_at = self.batches_taken
        try:
            self._on_quiet()
        except Exception:
            logger.exception("the work for a quiet moment failed")

    def retry_after_s(self, extra: int = 0) -> int:
        """Seconds until the queue has likely drained, from the recent throughput (1..60)."""
        if self._rows_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil((len(self._queue) + extra) / self._rows_per_s)))

    def _forget_if_cancelled(self, row: Row, _future: asyncio.Future[RowAnswer] | None = None) -> None:
        # A client that went away: drop its queued rows so nobody computes them.
        if row.future.cancelled() and row in self._queue:
            self._queue.remove(row)
            self._on_depth(len(self._queue))
            self._update_idle()

    async def run_in_worker(self, function: Callable[[], object]) -> None:
        """Run `function` on the thread that runs batches (warm-up: torch's per-thread state lives there)."""
        await self._worker.run(function)

    # --- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="deebert-batcher")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._arrivals_unsettled:
                    await self._let_arrivals_settle()
                    continue
                if self._idle_items and not self._closed and not self.streams_running:
                    await self._run_idle()
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill()
            if self.loop_batches == "all" and self._worker.pending == 0:
                await self._let_arrivals_queue()
            batch = self._take_batch()
            if not batch:
                continue
            if self._runs_on_loop(batch):
                self._run_here(batch)
                continue
            if self._runs_on_stream():
                self._start_on_stream(batch, loop)
                while not self._free_streams:  # the next batch waits for a stream (its texts stay in the queue)
                    self._stream_freed.clear()
                    await self._stream_freed.wait()
                continue
            started = self._batch_started(batch)
            try:  # on the worker thread: each answer goes through the event loop
                await self._worker.run(functools.partial(self._run, batch, loop.call_soon_threadsafe))
            finally:
                self._arrivals_unsettled = False
                self._finish_batch(len(batch), time.perf_counter() - started)

    def _runs_on_stream(self) -> bool:
        """Whether the batch just taken runs on a stream: texts still wait behind it, or a stream is running (a
        batch on all the threads then would compete with it)."""
        return self.streams > 1 and (bool(self._queue) or self.streams_running > 0)

    def _start_on_stream(self, batch: list[Row], loop: asyncio.AbstractEventLoop) -> None:
        """Start the batch on a free stream's thread, with the stream runner; the batcher goes on meanwhile."""
        worker = self._free_streams.pop()
        beside = self.streams_running - 1
        started = self._batch_started(batch)

        async def run() -> None:
            try:
                await worker.run(functools.partial(self._run, batch, loop.call_soon_threadsafe, self._stream_runner))
            finally:
                self._free_streams.append(worker)
                self._finish_batch(len(batch), time.perf_counter() - started, beside)
                self._stream_freed.set()
                self._wakeup.set()  # idle work waits for the streams to finish

        task = loop.create_task(run(), name="deebert-stream-batch")
        self._stream_tasks.add(task)
        task.add_done_callback(self._stream_tasks.discard)

    def _batch_started(self, batch: list[Row]) -> float:
        """Bookkeeping as a batch starts (any path): its texts count as running, the batch-size metric; the clock
        for `_finish_batch`."""
        self._running_rows += len(batch)
        self._on_batch(len(batch))
        return time.perf_counter()

    def _run_here(self, batch: list[Row]) -> None:
        """Run the batch here, on the event loop: each answer is given at once."""
        started = self._batch_started(batch)
        try:
            self._run(batch, _call_now)
        finally:
            # (`alone` holds the loop only while no other request is in flight: nothing to settle after it.)
            self._arrivals_unsettled = self.loop_batches == "all"
            self._finish_batch(len(batch), time.perf_counter() - started)

    async def _run_idle(self) -> None:
        # Small chunks: a text that arrives meanwhile waits for at most one chunk.
        chunk = self._idle_items[: self.idle_chunk_size]
        del self._idle_items[: self.idle_chunk_size]
        assert self._idle_runner is not None
        try:
            await self._worker.run(functools.partial(self._idle_runner, chunk))
        except Exception:  # background work must never stop the batcher
            logger.exception("idle work failed; %d items dropped", len(chunk))

    async def _wait_to_fill(self) -> None:
        """Wait until the batch is full or the oldest text has waited `max_wait_s`."""
        deadline = self._queue[0].enqueued_at + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            if not self._queue:
                return

    def _take_batch(self) -> list[Row]:
        """The oldest text plus, among the 2 × max_batch_size oldest, those closest to it in length.

        Grouping by length saves padding; looking only at the oldest texts bounds how often a text can be
        passed over, so under sustained overload no text waits much longer than the queue ahead of it takes
        to run (choosing from a whole queue of 8 batches let odd-length texts wait ~3× that under overload, and
        the p99 of a 60 s run at 3× capacity exceeded the bound the queue size implies).
        """
        queue = [row for row in self._queue if not row.future.done()]
        if len(queue) <= self.max_batch_size:
            batch = queue
        else:
            oldest = queue[0]
            by_length = sorted(queue[: 2 * self.max_batch_size], key=lambda row: row.length)
            position = by_length.index(oldest)
            size = self.max_batch_size
            best_start, best_cost = 0, math.inf
            for start in range(max(0, position - size + 1), min(position, len(by_length) - size) + 1):
                window = by_length[start : start + size]
                cost = window[-1].length * size - sum(row.length for row in window)
                if cost < best_cost:
                    best_start, best_cost = start, cost
            batch = by_length[best_start : best_start + size]
        taken = set(map(id, batch))
        self._queue = [row for row in self._queue if id(row) not in taken and not row.future.done()]
        if batch:
            self._last_wait_s = time.perf_counter() - min(row.enqueued_at for row in batch)
            self.batches_taken += 1
            self._arrivals_unsettled = False  # they are queued, or in this batch
        self._on_depth(len(self._queue))
        return batch

    def _runs_on_loop(self, batch: list[Row]) -> bool:
        """Whether this batch runs on the event loop (`loop_batches`); never while the worker thread has another
        job (a memory trim or a shadow re-run may hold it), nor before batches of its kind have been timed."""
        recent = self._recent_s.get(len(batch) > 1)
        if self.loop_batches == "none" or self._worker.pending or self.streams_running or recent is None:
            return False
        if self.loop_batches == "all":
            return recent <= self.loop_max_s
        # alone: under load a lone text is usually the first of a wave the loop has not read yet, so after a
        # bigger batch, or with another request in flight, it goes to the worker thread.
        return (
            len(batch) == 1
            and recent <= self.alone_max_s
            and not self._queue
            and self._last_batch_size <= 1
            and self._in_flight() <= 1
        )

    def _runs_at_once(self, rows: list[Row]) -> bool:
        """Whether a request's rows run inside its `submit`, in the request's own turn of the event loop: a lone
        text that the batcher's task would take alone and run on the loop anyway (nothing queued or running, the
        last batch one text too, no other request in flight, no wait to fill a batch). The hand-off to the
        batcher's task and back cost two turns of the loop: about 0.07 of a lone request's ~0.46 ms overhead on
        an AVX2-only AMD EPYC (median of 4 A/B pairs, BENCHMARKS.md §20)."""
        return (
            len(rows) == 1
            and self.max_wait_s == 0
            and self._task is not None
            and not self._closed
            and not self._queue
            and self._running_rows == 0
            and not self._arrivals_unsettled
            and self._last_batch_size <= 1
            and self._in_flight() <= 1
            and self._runs_on_loop(rows)
        )

    async def _let_arrivals_queue(self) -> None:
        """Turns of the loop for requests it has accepted but not queued yet (bodies still arriving, tokenizing,
        answers going out before the next requests come in) to join the batch: until the batch is full, every
        request in flight is queued, or three turns bring nothing (at most `ARRIVAL_TURNS_MAX`)."""
        quiet = 0
        for _ in range(ARRIVAL_TURNS_MAX):
            queued = len(self._queue)
            if queued >= self.max_batch_size or self._in_flight() <= queued or quiet >= 3:
                return
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._queue) == queued else 0

    async def _let_arrivals_settle(self) -> None:
        """After a batch held the event loop (`all`) with nothing queued behind it: turns of the loop for the
        requests that arrived meanwhile to be read and queued. Until one is queued (its batch is then taken as
        usual), or for three turns with no request in flight (at most `ARRIVAL_TURNS_MAX`); then the batcher is
        idle, and brownout may see the queue drained."""
        quiet = 0
        for _ in range(ARRIVAL_TURNS_MAX):
            if self._queue:
                return
            if quiet >= 3:
                break
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._in_flight() == 0 else 0
        self._arrivals_unsettled = False
        self._update_idle()

    def _run(self, batch: list[Row], deliver: Callable[..., Any], runner: Runner | None = None) -> None:
        """Run the batch (on `runner`, default the batcher's), answering each row as it exits through
        `deliver(function, *args)`: the event loop's `call_soon_threadsafe` from a worker thread, `_call_now` on the
        loop itself.

        The rows that leave together (a layer's exits, reported one after another) reach the loop in one
        hand-over: the first schedules it, the others join it while it has not run. One wake-up of the loop per
        layer instead of one per row."""
        started = time.perf_counter()
        for row in batch:
            row.started_at = started
        size = len(batch)
        lock = threading.Lock()
        exited: list[tuple[Row, Any, float]] = []

        def hand_over() -> None:
            nonlocal exited
            with lock:
                rows, exited = exited, []
            for row, value, finished in rows:
                self._resolve(row, value, finished, size)

        def on_exit(index: int, value: Any) -> None:
            with lock:
                exited.append((batch[index], value, time.perf_counter()))
                first = len(exited) == 1
            if first:
                deliver(hand_over)

        try:
            (runner or self._runner)([row.item for row in batch], [row.threshold for row in batch], on_exit)
        except Exception as err:  # the model failed: fail this batch's rows, keep serving
            deliver(self._fail, batch, err)

    def _resolve(self, row: Row, value: Any, finished: float, batch_size: int) -> None:
        answer = RowAnswer(value, row.started_at - row.enqueued_at, finished - row.started_at, batch_size)
        if not row.future.done():
            row.future.set_result(answer)
        # The answer's bookkeeping (metrics, shadow sampling) comes after the waiting request's own turn of the
        # loop (which the answer scheduled first), so that the response does not wait for it.
        asyncio.get_running_loop().call_soon(self._on_answer, row, answer)

    @staticmethod
    def _fail(batch: list[Row], err: Exception) -> None:
        for row in batch:
            if not row.future.done():
                row.future.set_exception(DeeBertError(ErrorType.INTERNAL, f"inference failed: {type(err).__name__}"))

    def _update_idle(self) -> None:
        if not self.busy:
            self._last_wait_s = 0.0
            self._idle.set()

    # --- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new texts, finish the queued and running ones; True when all finished in time."""
        self._closed = True
        self._idle_items.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._stream_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for row in self._queue:
            if not row.future.done():
                row.future.set_exception(
                    DeeBertError(ErrorType.SHUTTING_DOWN, "the server stopped before this text ran")
                )
        self._queue.clear()
        self._worker.shutdown()
        for worker in self._stream_workers:
            worker.shutdown()
