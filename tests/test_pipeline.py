"""The shared request pipeline's wait: answers, and a client that leaves before its answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server import pipeline
from server.batcher import RowAnswer
from server.errors import DeeBertError, ErrorType


class FakeRequest:
    """A request whose connection reports a disconnect after `leaves_after_s` (never when None)."""

    def __init__(self, leaves_after_s: float | None) -> None:
        self.leaves_after_s = leaves_after_s
        self.reads = 0

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self.leaves_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leaves_after_s or 0.0)
        return {"type": "http.disconnect"}


def test_prompt_answers_come_back_in_order_without_watching_the_connection() -> None:
    async def run() -> tuple[list[RowAnswer], int]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RowAnswer]] = [loop.create_future() for _ in range(3)]
        for index in (2, 0, 1):  # answered out of order
            loop.call_soon(futures[index].set_result, RowAnswer(index, 0.0, 0.0, 3))
        request = FakeRequest(leaves_after_s=0.0)
        answers = await pipeline.await_answers(request, futures)  # type: ignore[arg-type]
        return answers, request.reads

    answers, reads = asyncio.run(run())
    assert [a.value for a in answers] == [0, 1, 2]
    assert reads == 0, "an answer within the watch delay never reads the connection"


def test_a_client_that_leaves_while_queued_gets_its_rows_cancelled() -> None:
    async def run() -> tuple[ErrorType, list[bool]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RowAnswer]] = [loop.create_future() for _ in range(2)]
        with pytest.raises(DeeBertError) as raised:
            await pipeline.await_answers(FakeRequest(leaves_after_s=0.01), futures)  # type: ignore[arg-type]
        return raised.value.error_type, [f.cancelled() for f in futures]

    error_type, cancelled = asyncio.run(run())
    assert error_type is ErrorType.CLIENT_CLOSED_REQUEST
    assert cancelled == [True, True]


def test_a_failed_row_fails_the_request_with_its_error() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RowAnswer]] = [loop.create_future() for _ in range(2)]
        futures[0].set_result(RowAnswer("ok", 0.0, 0.0, 2))
        futures[1].set_exception(DeeBertError(ErrorType.INTERNAL, "inference failed: RuntimeError"))
        await pipeline.await_answers(FakeRequest(leaves_after_s=None), futures)  # type: ignore[arg-type]

    with pytest.raises(DeeBertError, match="inference failed"):
        asyncio.run(run())


def test_answers_already_there_come_back_without_a_turn_of_the_loop() -> None:
    """A lone text run inside its request's `submit` is answered before the wait starts: the wait returns at once
    (no watch timer, no suspension), and a failed row still fails the request."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RowAnswer]] = [loop.create_future() for _ in range(2)]
        for index, future in enumerate(futures):
            future.set_result(RowAnswer(index, 0.0, 0.0, 2))
        waiting = pipeline.await_answers(FakeRequest(leaves_after_s=0.0), futures)  # type: ignore[arg-type]
        with pytest.raises(StopIteration) as returned:
            waiting.send(None)  # one step: it never suspends
        assert [a.value for a in returned.value.value] == [0, 1]
        failed: asyncio.Future[RowAnswer] = loop.create_future()
        failed.set_exception(DeeBertError(ErrorType.INTERNAL, "inference failed: RuntimeError"))
        with pytest.raises(DeeBertError, match="inference failed"):
            await pipeline.await_answers(FakeRequest(leaves_after_s=None), [futures[0], failed])  # type: ignore[arg-type]

    asyncio.run(run())
