"""The batcher alone, with a plain fake runner: batching, grouping, backpressure, cancellation, drain."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from server.batcher import ARRIVAL_TURNS_MAX, Batcher, LoopBatches, Row, RowAnswer, WorkerThread
from server.errors import DeeBertError, ErrorType

pytestmark = pytest.mark.anyio


class Text(str):
    """A fake tokenized text: its length is what the batcher groups by."""


class FakeRunner:
    """Answers each row with (item, threshold); can block until released."""

    def __init__(self, blocked: bool = False, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not blocked:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
        self.batches.append(list(items))
        self.started.set()
        assert self.release.wait(10), "test runner was never released"
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("model exploded")
        for index, (item, threshold) in enumerate(zip(items, thresholds, strict=True)):
            on_exit(index, (item, threshold))


async def test_rows_are_answered_with_their_own_threshold() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch_size=8, max_wait_s=0.05, max_queue_size=100)
    batcher.start()
    futures = batcher.submit([Text("a"), Text("bb")], [0.1, 0.2]) + batcher.submit([Text("ccc")], [0.3])
    answers = await asyncio.gather(*futures)
    assert [a.value for a in answers] == [("a", 0.1), ("bb", 0.2), ("ccc", 0.3)]
    assert runner.batches == [["a", "bb", "ccc"]], "rows submitted within max_wait share one batch"
    assert all(a.batch_size == 3 and a.queue_s >= 0 and a.compute_s >= 0 for a in answers)
    await batcher.stop()


async def test_batches_respect_the_max_size_and_group_similar_lengths() -> None:
    runner = FakeRunner(blocked=True)
    batcher = Batcher(runner, max_batch_size=3, max_wait_s=0.0, max_queue_size=100)
    batcher.start()
    first = batcher.submit([Text("x")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)  # the runner holds the first batch
    lengths = [1, 9, 2, 8, 1, 9]
    futures = batcher.submit([Text("y" * n) for n in lengths], [0.0] * len(lengths))
    runner.release.set()
    await asyncio.gather(*first, *futures)
    later = [sorted(len(t) for t in batch) for batch in runner.batches[1:]]
    assert all(len(batch) <= 3 for batch in runner.batches)
    # The oldest (length 1) goes first with its nearest lengths; the long texts go together.
    assert later == [[1, 1, 2], [8, 9, 9]]
    await batcher.stop()


async def test_length_grouping_looks_only_at_the_oldest_two_batches() -> None:
    """A short text queued behind many long ones is not taken ahead of them: no text is passed over for
    long, however many newer texts of the oldest one's length keep arriving."""
    runner = FakeRunner(blocked=True)
    batcher = Batcher(runner, max_batch_size=2, max_wait_s=0.0, max_queue_size=100)
    batcher.start()
    first = batcher.submit([Text("x")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    # Queue: a short text, 8 long ones, then a short one: the second short text is outside the window
    # (the 2 x 2 oldest texts) the first batch chooses from, so it is not paired with the first.
    lengths = [1] + [9] * 8 + [1]
    futures = batcher.submit([Text("y" * n) for n in lengths], [0.0] * len(lengths))
    runner.release.set()
    await asyncio.gather(*first, *futures)
    later = [sorted(len(t) for t in batch) for batch in runner.batches[1:]]
    assert later[0] == [1, 9], f"the window is the 2 x 2 oldest texts: {later}"
    await batcher.stop()


async def test_a_full_queue_refuses_with_429_and_retry_after() -> None:
    runner = FakeRunner(blocked=True)
    batcher = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=2)
    batcher.start()
    running = batcher.submit([Text("a")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    queued = batcher.submit([Text("b"), Text("c")], [0.0, 0.0])
    assert batcher.depth == 2
    with pytest.raises(DeeBertError) as err:
        batcher.submit([Text("d")], [0.0])
    assert err.value.error_type is ErrorType.OVERLOADED and err.value.status == 429
    assert int(err.value.headers["Retry-After"]) >= 1
    runner.release.set()
    assert len(await asyncio.gather(*running, *queued)) == 3
    await batcher.stop()


async def test_a_cancelled_queued_row_is_dropped_and_batch_mates_are_answered() -> None:
    runner = FakeRunner(blocked=True)
    depths: list[int] = []
    batcher = Batcher(runner, max_batch_size=4, max_wait_s=0.0, max_queue_size=10, on_depth=depths.append)
    batcher.start()
    running = batcher.submit([Text("a")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    gone = batcher.submit([Text("gone")], [0.0])
    staying = batcher.submit([Text("stay")], [0.0])
    gone[0].cancel()
    await asyncio.sleep(0)
    assert batcher.depth == 1
    runner.release.set()
    answers = await asyncio.gather(*running, *staying)
    assert [a.value[0] for a in answers] == ["a", "stay"]
    assert all("gone" not in batch for batch in runner.batches)
    assert depths[-1] == 0
    await batcher.stop()


async def test_a_failing_batch_fails_only_its_rows() -> None:
    runner = FakeRunner(fail_on="boom")
    batcher = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10)
    batcher.start()
    bad = batcher.submit([Text("boom")], [0.0])
    good = batcher.submit([Text("fine")], [0.0])
    with pytest.raises(DeeBertError) as err:
        await bad[0]
    assert err.value.error_type is ErrorType.INTERNAL and "boom" not in err.value.message
    assert (await good[0]).value == ("fine", 0.0)
    await batcher.stop()


async def test_drain_finishes_accepted_work_and_refuses_new() -> None:
    runner = FakeRunner(blocked=True)
    batcher = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10)
    batcher.start()
    accepted = batcher.submit([Text("a"), Text("b"), Text("c")], [0.0] * 3)
    await asyncio.to_thread(runner.started.wait, 5)
    drain = asyncio.create_task(batcher.drain(timeout_s=10))
    await asyncio.sleep(0.01)
    with pytest.raises(DeeBertError) as err:
        batcher.submit([Text("late")], [0.0])
    assert err.value.error_type is ErrorType.SHUTTING_DOWN
    runner.release.set()
    assert await drain is True
    assert [f.result().value[0] for f in accepted] == ["a", "b", "c"]
    await batcher.stop()


class IdleLog:
    """A fake idle runner that records each chunk it ran and what the main queue looked like then."""

    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner
        self.chunks: list[list[str]] = []
        self.main_batches_before: list[int] = []
        self.done = threading.Event()

    def __call__(self, items: list[Any]) -> None:
        self.chunks.append(list(items))
        self.main_batches_before.append(len(self.runner.batches))
        self.done.set()


async def test_idle_work_runs_only_after_the_waiting_texts_in_small_chunks() -> None:
    runner = FakeRunner(blocked=True)
    idle = IdleLog(runner)
    batcher = Batcher(runner, max_batch_size=2, max_wait_s=0.0, max_queue_size=10, idle_runner=idle, idle_chunk_size=2)
    batcher.start()
    first = batcher.submit([Text("a")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    assert batcher.submit_idle(["s1", "s2", "s3"])
    queued = batcher.submit([Text("b"), Text("c"), Text("d")], [0.0] * 3)
    runner.release.set()
    await asyncio.gather(*first, *queued)
    await asyncio.to_thread(idle.done.wait, 5)
    for _ in range(100):
        if batcher.idle_depth == 0 and len(idle.chunks) == 2:
            break
        await asyncio.sleep(0.01)
    assert idle.chunks == [["s1", "s2"], ["s3"]]
    assert idle.main_batches_before[0] == len(runner.batches) == 3, "idle work waits for every queued text"
    await batcher.stop()


async def test_idle_queue_is_bounded_refused_without_a_runner_and_cleared_by_drain() -> None:
    runner = FakeRunner(blocked=True)
    idle = IdleLog(runner)
    without = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10)
    assert not without.submit_idle(["x"]), "no idle runner: nothing to queue for"
    batcher = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10, idle_runner=idle, max_idle_items=2)
    batcher.start()
    busy = batcher.submit([Text("a")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    assert batcher.submit_idle(["s1", "s2"]) and not batcher.submit_idle(["s3"])
    drain = asyncio.create_task(batcher.drain(timeout_s=10))
    await asyncio.sleep(0.01)
    assert batcher.idle_depth == 0 and not batcher.submit_idle(["s4"])
    runner.release.set()
    assert await drain is True and len(await asyncio.gather(*busy)) == 1
    await batcher.stop()
    assert idle.chunks == [], "background work never delays a shutdown"


async def test_queue_wait_is_the_oldest_wait_and_zero_once_drained() -> None:
    runner = FakeRunner(blocked=True)
    batcher = Batcher(runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10)
    assert batcher.queue_wait_s == 0.0
    batcher.start()
    first = batcher.submit([Text("a")], [0.0])
    await asyncio.to_thread(runner.started.wait, 5)
    waiting = batcher.submit([Text("b")], [0.0])
    await asyncio.sleep(0.05)
    assert batcher.queue_wait_s >= 0.05, "a text waiting behind a running batch counts from its arrival"
    runner.release.set()
    await asyncio.gather(*first, *waiting)
    for _ in range(100):
        if not batcher.busy:
            break
        await asyncio.sleep(0.01)
    assert batcher.queue_wait_s == 0.0
    await batcher.stop()


async def test_the_worker_thread_runs_jobs_in_order_passes_errors_and_outlives_a_cancelled_caller() -> None:
    worker = WorkerThread("deebert-batch-test")
    assert await worker.run(threading.current_thread) is not threading.current_thread()
    assert (await worker.run(threading.current_thread)).name == "deebert-batch-test", "one named thread, reused"

    def explode() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        await worker.run(explode)
    # A caller cancelled mid-job: the job finishes on the thread, its answer is dropped, the next job runs.
    release, finished = threading.Event(), threading.Event()

    def slow() -> str:
        assert release.wait(10)
        finished.set()
        return "late"

    waiting = asyncio.ensure_future(worker.run(slow))
    await asyncio.sleep(0.01)
    waiting.cancel()
    release.set()
    assert await worker.run(lambda: "next") == "next"
    assert finished.is_set() and waiting.cancelled()
    thread = await worker.run(threading.current_thread)
    worker.shutdown()
    assert not thread.is_alive(), "shutdown ends the thread"


class ThreadRecordingRunner(FakeRunner):
    """A FakeRunner that records which thread ran each batch."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__(fail_on=fail_on)
        self.threads: list[int] = []

    def __call__(self, items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
        self.threads.append(threading.get_ident())
        super().__call__(items, thresholds, on_exit)


def loop_batcher(
    runner: ThreadRecordingRunner,
    loop_batches: LoopBatches,
    in_flight: Callable[[], int] = lambda: 1,
    max_s: float = 60,
) -> Batcher:
    """A batcher whose batches may run on the event loop (`loop_batches`), timed as quick unless `max_s` says not."""
    return Batcher(
        runner, max_batch_size=8, max_wait_s=0.0, max_queue_size=100, loop_batches=loop_batches,
        in_flight=in_flight, alone_max_s=max_s, loop_max_s=max_s,
    )  # fmt: skip


async def test_a_lone_text_runs_on_the_event_loop_once_batches_of_one_are_known_to_be_quick() -> None:
    runner = ThreadRecordingRunner(fail_on="boom")
    in_flight = [1]
    batcher = loop_batcher(runner, "alone", lambda: in_flight[0])
    batcher.start()
    loop_thread = threading.get_ident()
    for text in ("a", "b"):  # the first batch of one is measured on the worker thread; the second runs here
        (answer,) = await asyncio.gather(*batcher.submit([Text(text)], [0.5]))
        assert answer.value == (text, 0.5) and answer.batch_size == 1 and answer.queue_s >= 0
    assert runner.threads[0] != loop_thread and runner.threads[1] == loop_thread
    in_flight[0] = 2  # another request is in the server: its text may join, so the worker thread runs it
    await asyncio.gather(*batcher.submit([Text("c")], [0.5]))
    in_flight[0] = 1
    await asyncio.gather(*batcher.submit([Text("d"), Text("e")], [0.5, 0.5]))  # two texts: a batch
    await asyncio.gather(*batcher.submit([Text("f")], [0.5]))  # after a batch of two, not alone yet
    await asyncio.gather(*batcher.submit([Text("g")], [0.5]))
    on_loop = [thread == loop_thread for thread in runner.threads]
    assert on_loop == [False, True, False, False, False, True]
    with pytest.raises(DeeBertError) as failed:  # a model error on the loop fails its text, and only it
        await asyncio.gather(*batcher.submit([Text("boom")], [0.5]))
    assert failed.value.error_type is ErrorType.INTERNAL and runner.threads[-1] == loop_thread
    (after,) = await asyncio.gather(*batcher.submit([Text("h")], [0.5]))
    assert after.value == ("h", 0.5) and not batcher.busy
    await batcher.stop()


async def settled(batcher: Batcher) -> None:
    """Wait (up to 5 s) until the batcher's last batch on the worker thread is settled on the event loop."""
    deadline = time.monotonic() + 5
    while batcher.busy:
        assert time.monotonic() < deadline, "the batcher stayed busy"
        await asyncio.sleep(0.001)


async def test_a_lone_text_that_would_run_on_the_loop_runs_inside_submit() -> None:
    """No hand-off to the batcher's task and back: the future is done when `submit` returns, the batch was counted
    and timed as any other. Only when the batcher's task would run the text alone on the loop anyway."""
    loop_thread = threading.get_ident()
    for loop_batches in ("alone", "all"):
        runner = ThreadRecordingRunner()
        in_flight = [1]
        batches: list[int] = []
        batcher = Batcher(
            runner, max_batch_size=8, max_wait_s=0.0, max_queue_size=100, on_batch=batches.append,
            loop_batches=loop_batches, in_flight=functools.partial(in_flight.__getitem__, 0), alone_max_s=60,
            loop_max_s=60,
        )  # fmt: skip
        batcher.start()
        (first,) = batcher.submit([Text("a")], [0.5])
        assert not first.done(), "batches of one not timed yet: the batcher's task runs it on the worker thread"
        await first
        await settled(batcher)  # the worker thread's batch is settled
        taken = batcher.batches_taken
        (at_once,) = batcher.submit([Text("b")], [0.25])
        assert at_once.done() and at_once.result().value == ("b", 0.25), loop_batches
        assert at_once.result().batch_size == 1 and 0 <= at_once.result().queue_s < 0.05
        assert runner.threads[-1] == loop_thread and batcher.batches_taken == taken + 1 and batches == [1, 1]
        assert not batcher.busy or loop_batches == "all"
        in_flight[0] = 2  # another request in the server may join it: the batcher's task decides
        (joined,) = batcher.submit([Text("c")], [0.5])
        assert not joined.done()
        await joined
        in_flight[0] = 1
        await asyncio.gather(*batcher.submit([Text("d"), Text("e")], [0.5, 0.5]))
        await settled(batcher)
        (after_two,) = batcher.submit([Text("f")], [0.5])
        assert not after_two.done(), "after a batch of more texts, a lone one is likely the first of a wave"
        await after_two
        await batcher.stop()
    waiting = Batcher(
        ThreadRecordingRunner(), max_batch_size=8, max_wait_s=0.001, max_queue_size=100, loop_batches="alone",
        alone_max_s=60,
    )  # fmt: skip
    waiting.start()
    for text in ("a", "b"):  # a wait to fill batches is configured: every text waits for batch-mates
        (future,) = waiting.submit([Text(text)], [0.5])
        assert not future.done()
        await future
    await waiting.stop()


async def test_all_batches_run_on_the_event_loop_once_their_kind_is_known_to_be_quick() -> None:
    runner = ThreadRecordingRunner(fail_on="boom")
    batcher = loop_batcher(runner, "all", lambda: 5)
    batcher.start()
    loop_thread = threading.get_ident()
    # The first batch of one and the first of more texts are measured on the worker thread; then both kinds run
    # here, on the loop, whatever else is in flight.
    for texts in (["a"], ["b"], ["c", "d"], ["e", "f"], ["g"]):
        answers = await asyncio.gather(*batcher.submit([Text(t) for t in texts], [0.5] * len(texts)))
        assert [a.value for a in answers] == [(t, 0.5) for t in texts]
        assert all(a.batch_size == len(texts) and a.queue_s >= 0 for a in answers)
    assert [thread == loop_thread for thread in runner.threads] == [False, True, False, True, True]
    with pytest.raises(DeeBertError) as failed:  # a model error on the loop fails its batch, and only it
        await asyncio.gather(*batcher.submit([Text("boom"), Text("x")], [0.5, 0.5]))
    assert failed.value.error_type is ErrorType.INTERNAL and runner.threads[-1] == loop_thread
    (after,) = await asyncio.gather(*batcher.submit([Text("h")], [0.5]))
    assert after.value == ("h", 0.5) and batcher.busy, "requests may still arrive from the batch's time on the loop"
    assert await turns_until_idle(batcher) <= ARRIVAL_TURNS_MAX + 1, "five counted in flight that never come"
    await batcher.stop()


async def turns_until_idle(batcher: Batcher, most: int = 1000) -> int:
    """Turns of the event loop until the batcher is no longer busy (at most `most`)."""
    for turn in range(most):
        if not batcher.busy:
            return turn
        await asyncio.sleep(0)
    return most


class SlowRunner(ThreadRecordingRunner):
    """Each batch takes at least `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
        time.sleep(self.seconds)
        super().__call__(items, thresholds, on_exit)


async def test_after_a_batch_held_the_loop_the_batcher_stays_busy_until_arrivals_are_queued() -> None:
    """With `all`, requests that arrive while a batch holds the event loop wait unread: the batcher counts as busy
    (brownout does not see a drained queue) until they have had their turns to be queued, and only then idles.
    The old way, idle at the batch's end, let brownout end after every batch (37-47 % of tests/test_brownout.py's
    overload degraded, against 99 % now, by hand)."""
    runner = SlowRunner(0.02)
    in_flight = [1]
    batcher = loop_batcher(runner, "all", lambda: in_flight[0])
    batcher.start()
    loop_thread = threading.get_ident()
    for text in ("a", "b"):  # the first is timed on the worker thread, the second holds the loop
        await asyncio.gather(*batcher.submit([Text(text)], [0.5]))
    assert runner.threads[-1] == loop_thread
    assert batcher.busy and batcher.depth == 0, "just after it, the requests that came meanwhile are still unread"
    (queued,) = batcher.submit([Text("c")], [0.5])  # one is read and queued: its batch is taken as usual
    await queued
    assert runner.batches[-1] == ["c"] and batcher.busy
    in_flight[0] = 0  # idle once nothing more comes: nobody in flight for three turns
    assert 3 <= await turns_until_idle(batcher) <= 5
    assert batcher.queue_wait_s == 0.0
    await batcher.stop()


async def test_a_slow_model_or_none_keeps_every_batch_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    cases: list[tuple[LoopBatches, float]] = [("alone", 0.0), ("all", 0.0), ("none", 60.0)]
    for loop_batches, max_s in cases:
        runner = ThreadRecordingRunner()
        batcher = loop_batcher(runner, loop_batches, max_s=max_s)
        batcher.start()
        for texts in (["a"], ["b"], ["c", "d"], ["e", "f"], ["g"]):
            await asyncio.gather(*batcher.submit([Text(t) for t in texts], [0.5] * len(texts)))
        assert len(runner.threads) == 5 and loop_thread not in runner.threads, loop_batches
        await batcher.stop()


async def test_a_batch_waits_while_the_worker_thread_has_a_job() -> None:
    for loop_batches in ("alone", "all"):
        runner = ThreadRecordingRunner()
        batcher = loop_batcher(runner, loop_batches)
        batcher.start()
        await asyncio.gather(*batcher.submit([Text("a")], [0.5]))  # measured: batches of one are quick
        release = threading.Event()
        housekeeping = asyncio.ensure_future(batcher.run_in_worker(functools.partial(release.wait, 5)))
        await asyncio.sleep(0.01)
        answer = batcher.submit([Text("b")], [0.5])
        await asyncio.sleep(0.01)
        assert len(runner.threads) == 1, "the worker thread is busy with another job: the text waits its turn"
        release.set()
        await asyncio.gather(housekeeping, *answer)
        assert runner.threads[1] != threading.get_ident()
        await batcher.stop()


async def test_before_a_batch_holds_the_loop_the_requests_it_accepted_join_it() -> None:
    """Requests in flight but not yet queued (still being read or tokenized) get turns of the loop to join the
    batch; requests the server counts that never come hold it up for three quiet turns only."""
    runner = ThreadRecordingRunner()
    in_flight = [1]
    batcher = loop_batcher(runner, "all", lambda: in_flight[0])
    batcher.start()
    for texts in (["a"], ["b", "c"]):  # both kinds measured on the worker thread
        await asyncio.gather(*batcher.submit([Text(t) for t in texts], [0.5] * len(texts)))

    async def arriving(text: str, turns: int) -> RowAnswer:
        for _ in range(turns):  # a request the loop is still reading
            await asyncio.sleep(0)
        (future,) = batcher.submit([Text(text)], [0.5])
        return await future

    in_flight[0] = 3
    late = [asyncio.ensure_future(arriving("y", 1)), asyncio.ensure_future(arriving("z", 2))]
    first = await asyncio.gather(*batcher.submit([Text("x")], [0.5]))
    await asyncio.gather(*late)
    assert runner.batches[-1] == ["x", "y", "z"] and first[0].batch_size == 3
    in_flight[0] = 5  # two more counted that never arrive: the batch goes after three quiet turns
    (alone,) = await asyncio.wait_for(asyncio.gather(*batcher.submit([Text("w")], [0.5])), 5)
    assert runner.batches[-1] == ["w"] and alone.batch_size == 1
    await batcher.stop()


async def test_a_texts_bookkeeping_runs_after_its_request_resumes() -> None:
    """`on_answer` (metrics, shadow sampling) comes after the waiting request's turn, on either path, with the
    answer the request got."""
    events: list[tuple[str, Any]] = []
    for loop_batches in ("none", "all"):
        events.clear()
        batcher = Batcher(
            FakeRunner(),
            max_batch_size=4,
            max_wait_s=0.0,
            max_queue_size=10,
            on_answer=lambda row, answer: events.append(("bookkeeping", answer.value)),
            loop_batches=loop_batches,
            loop_max_s=60,
        )
        batcher.start()
        for text in ("a", "b"):  # the second one runs on the loop with `all`
            (future,) = batcher.submit([Text(text)], [0.5])
            events.append(("request", (await future).value))
            await asyncio.sleep(0)
        assert events == [
            ("request", ("a", 0.5)),
            ("bookkeeping", ("a", 0.5)),
            ("request", ("b", 0.5)),
            ("bookkeeping", ("b", 0.5)),
        ]
        await batcher.stop()


async def test_rows_leaving_together_reach_the_event_loop_in_one_hand_over() -> None:
    """A layer's exits, reported one after another from the worker thread, wake the loop once: the first
    schedules the hand-over and the rest join it until it runs; a row reported after it ran schedules another."""
    scheduled: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def run_scheduled() -> None:
        while scheduled:
            function, args = scheduled.pop(0)
            function(*args)

    def runner(items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
        for index in (0, 1, 2):  # one layer's exits
            on_exit(index, items[index])
        assert len(scheduled) == 1, "three rows leaving together: one hand-over"
        run_scheduled()  # the loop takes them
        for index in (3, 4):
            on_exit(index, items[index])

    batcher = Batcher(runner, max_batch_size=8, max_wait_s=0.05, max_queue_size=100)
    loop = asyncio.get_running_loop()
    rows = [Row(Text(text), 0.0, loop.create_future(), time.perf_counter()) for text in "abcde"]
    batcher._run(rows, lambda function, *args: scheduled.append((function, args)))
    assert [row.future.done() for row in rows] == [True, True, True, False, False]
    assert len(scheduled) == 1, "the second layer's two rows: one more hand-over"
    run_scheduled()
    answers = [row.future.result() for row in rows]
    assert [answer.value for answer in answers] == list("abcde")
    assert all(answer.batch_size == 5 and answer.compute_s >= 0 for answer in answers)


async def test_rows_that_left_before_the_model_failed_keep_their_answers() -> None:
    """A runner that reports two rows and then fails: those two are answered (their hand-over reaches the loop
    before the failure does), the rest of the batch fails with a 500, and the batcher serves the next batch."""

    def runner(items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
        if "next" in items:
            on_exit(0, "next")
            return
        on_exit(0, items[0])
        on_exit(1, items[1])
        raise RuntimeError("model exploded at layer 2")

    batcher = Batcher(runner, max_batch_size=4, max_wait_s=0.05, max_queue_size=10)
    batcher.start()
    futures = batcher.submit([Text("a"), Text("b"), Text("c"), Text("d")], [0.0] * 4)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [getattr(outcome, "value", None) for outcome in outcomes[:2]] == ["a", "b"]
    assert all(isinstance(outcome, DeeBertError) for outcome in outcomes[2:])
    assert all(outcome.error_type is ErrorType.INTERNAL for outcome in outcomes[2:])  # type: ignore[union-attr]
    assert (await batcher.submit([Text("next")], [0.0])[0]).value == "next"
    await batcher.stop()


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_the_work_for_a_quiet_moment_runs_after_the_last_answer_of_a_busy_spell_only() -> None:
    """`on_quiet` (the tokenizer's re-warm) runs once the batcher has nothing queued or running and no request is
    in flight, after the answers' bookkeeping, on either path; never between batches of a busy spell, never while
    a request is in flight, and once per spell whether the batcher or an ending request (`run_if_quiet`) asks."""
    for loop_batches in ("none", "alone"):
        events: list[str] = []
        in_flight = [0]  # requests in the server: each counts until it has its answer and has ended
        runner = FakeRunner(blocked=True)
        batcher = Batcher(
            runner, max_batch_size=1, max_wait_s=0.0, max_queue_size=10,
            on_answer=lambda row, answer, events=events: events.append(f"bookkeeping {answer.value[0]}"),
            loop_batches=loop_batches, in_flight=functools.partial(in_flight.__getitem__, 0), alone_max_s=60,
            on_quiet=functools.partial(events.append, "quiet"),
        )  # fmt: skip
        batcher.start()
        in_flight[0] = 2
        first, second = batcher.submit([Text("a")], [0.5]) + batcher.submit([Text("b")], [0.5])
        assert await asyncio.to_thread(runner.started.wait, 5)
        runner.release.set()  # two batches of one in a row: the second is queued when the first ends
        for future in (first, second):
            events.append(f"request {(await future).value[0]}")
            in_flight[0] -= 1
        await settled(batcher)
        await turns()
        assert events == ["request a", "bookkeeping a", "request b", "bookkeeping b", "quiet"], loop_batches
        for text, others in (("c", 1), ("d", 0)):  # another request arrives while c's answer goes out
            in_flight[0] = 1
            (future,) = batcher.submit([Text(text)], [0.5])
            assert future.done() == (loop_batches == "alone"), "a lone text runs inside submit"
            events.append(f"request {(await future).value[0]}")
            in_flight[0] += others
            batcher.run_if_quiet(requests_of_caller=1)  # as the server does as a request ends: it counts itself
            in_flight[0] = others
            await settled(batcher)
            await turns()
        expected = ["request c", "bookkeeping c", "request d", "quiet", "bookkeeping d"]
        if loop_batches == "none":  # d's answer came from the worker thread: its batch was not over yet
            expected = ["request c", "bookkeeping c", "request d", "bookkeeping d", "quiet"]
        assert events[5:] == expected, loop_batches
        batcher.run_if_quiet()
        assert events.count("quiet") == 2, "once per busy spell"
        await batcher.stop()


async def test_a_failing_quiet_moment_is_logged_and_the_batcher_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("rewarm exploded")

    batcher = Batcher(FakeRunner(), max_batch_size=4, max_wait_s=0.0, max_queue_size=10, on_quiet=fail)
    batcher.start()
    for text in ("a", "b"):
        (answer,) = await asyncio.gather(*batcher.submit([Text(text)], [0.5]))
        assert answer.value == (text, 0.5)
        await settled(batcher)
        await turns()
    assert [r.getMessage() for r in caplog.records].count("the work for a quiet moment failed") == 2
    await batcher.stop()


class SharedCores:
    """Runners for the whole model (`main`) and for batch streams (`stream`) that record which batches each ran,
    how many ran at once, and whether a batch on the whole model ever ran beside another one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[str, int] = {"main": 0, "stream": 0}
        self.batches: dict[str, list[list[str]]] = {"main": [], "stream": []}
        self.most_streams_at_once = 0
        self.main_beside_other = False
        self.release = threading.Event()
        self.release.set()
        self.two_streams_running = threading.Event()
        self.started = {"main": threading.Event(), "stream": threading.Event()}

    def runner(self, kind: str) -> Callable[[list[Any], list[float], Callable[[int, Any], None]], None]:
        def run(items: list[Any], thresholds: list[float], on_exit: Callable[[int, Any], None]) -> None:
            with self.lock:
                self.batches[kind].append(list(items))
                self.active[kind] += 1
                if kind == "main" and (self.active["main"] > 1 or self.active["stream"]):
                    self.main_beside_other = True
                if kind == "stream" and self.active["main"]:
                    self.main_beside_other = True
                self.most_streams_at_once = max(self.most_streams_at_once, self.active["stream"])
                if self.active["stream"] >= 2:
                    self.two_streams_running.set()
                self.started[kind].set()
            try:
                assert self.release.wait(10), "test runner was never released"
                for index, (item, threshold) in enumerate(zip(items, thresholds, strict=True)):
                    on_exit(index, (item, threshold))
            finally:
                with self.lock:
                    self.active[kind] -= 1

        return run


def stream_batcher(cores: SharedCores, max_batch_size: int = 2, streams: int = 2) -> Batcher:
    return Batcher(
        cores.runner("main"),
        max_batch_size=max_batch_size,
        max_wait_s=0.0,
        max_queue_size=100,
        stream_runner=cores.runner("stream"),
        streams=streams,
    )


async def test_under_load_batches_run_on_the_streams_side_by_side() -> None:
    """Texts waiting behind a batch send it to a stream; up to `streams` run at once, never beside a batch on the
    whole model; every text gets its own answer, and the batcher is idle again afterwards."""
    cores = SharedCores()
    cores.release.clear()
    batcher = stream_batcher(cores)
    batcher.start()
    texts = [Text(letter) for letter in "abcdef"]
    futures = batcher.submit(texts, [0.1 * n for n in range(len(texts))])
    assert await asyncio.to_thread(cores.two_streams_running.wait, 5)
    assert batcher.streams_running == 2 and batcher.busy
    assert batcher.depth == 2, "the third batch waits in the queue for a free stream"
    cores.release.set()
    answers = await asyncio.gather(*futures)
    assert [a.value for a in answers] == [(t, 0.1 * n) for n, t in enumerate(texts)]
    assert sorted(cores.batches["stream"][:2]) == [["a", "b"], ["c", "d"]]
    # The last batch had nothing behind it: a stream if the other was still running, else the whole model.
    assert cores.batches["main"] in ([], [["e", "f"]])
    assert sorted(t for batch in cores.batches["stream"] + cores.batches["main"] for t in batch) == list("abcdef")
    assert cores.most_streams_at_once == 2 and not cores.main_beside_other
    assert await batcher.drain(timeout_s=5) is True
    assert batcher.streams_running == 0 and not batcher.busy
    await batcher.stop()


async def test_a_batch_with_nothing_behind_it_runs_on_the_whole_model_alone() -> None:
    """No text waiting and no stream running: the batch gets all the threads (the whole model's runner); the
    texts that queue meanwhile go to the streams once it ends, and the streams' batches end before the next batch
    on the whole model starts."""
    cores = SharedCores()
    cores.release.clear()
    batcher = stream_batcher(cores, max_batch_size=4)
    batcher.start()
    first = batcher.submit([Text("a"), Text("b")], [0.0, 0.0])
    assert await asyncio.to_thread(cores.started["main"].wait, 5)
    assert cores.batches["main"] == [["a", "b"]] and cores.batches["stream"] == []
    later = batcher.submit([Text(str(n)) for n in range(10)], [0.0] * 10)
    cores.release.set()
    await asyncio.gather(*first, *later)
    assert cores.batches["stream"], "the backlog ran on the streams"
    assert sorted(t for batch in cores.batches["stream"] + cores.batches["main"][1:] for t in batch) == sorted(
        str(n) for n in range(10)
    ), "every text of the backlog ran once (its last batch on the whole model if both streams had ended by then)"
    assert not cores.main_beside_other
    last = batcher.submit([Text("z")], [0.0])
    await asyncio.gather(*last)
    assert cores.batches["main"][-1] == ["z"], "with the streams idle and nothing behind it, the whole model again"
    assert not cores.main_beside_other
    await batcher.stop()


async def test_one_stream_or_no_stream_runner_runs_one_batch_at_a_time() -> None:
    cores = SharedCores()
    for batcher in (stream_batcher(cores, streams=1), Batcher(cores.runner("main"), 2, 0.0, 100, streams=2)):
        assert batcher.streams == 1
        batcher.start()
        await asyncio.gather(*batcher.submit([Text(letter) for letter in "abcdef"], [0.0] * 6))
        await batcher.stop()
    assert cores.batches["stream"] == [] and len(cores.batches["main"]) == 6
    assert not cores.main_beside_other


async def test_idle_work_waits_for_the_streams() -> None:
    """Background items (shadow re-runs) go to the worker thread only once the streams have finished too."""
    cores = SharedCores()
    cores.release.clear()
    ran: list[tuple[list[str], int]] = []

    def idle(items: list[Any]) -> None:
        ran.append((list(items), cores.active["stream"]))

    batcher = Batcher(
        cores.runner("main"), 2, 0.0, 100, idle_runner=idle, stream_runner=cores.runner("stream"), streams=2
    )
    batcher.start()
    futures = batcher.submit([Text(letter) for letter in "abcd"], [0.0] * 4)
    assert await asyncio.to_thread(cores.two_streams_running.wait, 5)
    assert batcher.submit_idle(["shadow"])
    await asyncio.sleep(0.05)
    assert ran == [], "not while the streams run"
    cores.release.set()
    await asyncio.gather(*futures)
    for _ in range(100):
        if ran:
            break
        await asyncio.sleep(0.01)
    assert ran == [(["shadow"], 0)]
    await batcher.stop()


async def test_stopping_with_batches_on_the_streams_fails_the_queued_texts_and_ends_the_threads() -> None:
    cores = SharedCores()
    cores.release.clear()
    batcher = stream_batcher(cores)
    batcher.start()
    futures = batcher.submit([Text(letter) for letter in "abcdef"], [0.0] * 6)
    assert await asyncio.to_thread(cores.two_streams_running.wait, 5)
    threading.Timer(0.05, cores.release.set).start()  # the running batches end while `stop` waits for the threads
    await batcher.stop()
    queued = [f for f in futures if f.done() and f.exception() is not None]
    assert queued and all(f.exception().error_type is ErrorType.SHUTTING_DOWN for f in queued)  # type: ignore[union-attr]
    workers = batcher._stream_workers
    assert len(workers) == 2 and all(worker._thread is None for worker in workers), "each stream's thread ended"
