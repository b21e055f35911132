"""The engine's tokenizers are never shared between threads: short inputs on the event loop, long ones on the
tokenizing thread with its own copy (a fast tokenizer sets its truncation as state at every call)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from server.engine import Engine
from tests.server_helpers import tiny_engine, write_word_vocab

LONG = "i love this cat and the movie was very dull " * 100  # 1000 words: truncated to 48 tokens
SHORT = "the movie was good but the plot was dull " * 8  # 72 words: truncated too


class RecordingTokenizer:
    """The tokenizer, recording the thread of every call."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.threads: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        return self.tokenizer(*args, **kwargs)


def test_long_inputs_are_tokenized_on_their_own_thread_with_their_own_tokenizer(tmp_path: Path) -> None:
    engine = tiny_engine(write_word_vocab(tmp_path))
    on_loop, off_loop = RecordingTokenizer(engine.tokenizer), RecordingTokenizer(engine._off_loop_tokenizer)
    engine.tokenizer, engine._off_loop_tokenizer = on_loop, off_loop

    async def both() -> tuple[Any, Any]:
        return engine.tokenize([LONG, SHORT], None, True), await engine.tokenize_off_loop([LONG, SHORT], None, True)

    inline, threaded = asyncio.run(both())
    assert inline == threaded, "the copy encodes exactly as the original"
    assert on_loop.threads == {threading.current_thread().name}
    assert off_loop.threads == {"deebert-tokenize_0"}


def test_tokenizing_on_both_threads_at_once_truncates_every_text(tmp_path: Path) -> None:
    # With one tokenizer shared by both threads, a call that needs no truncation (which switches it off) could
    # land between the other thread's switching it on and its encoding: about 1 text in 200 came back
    # untruncated here (74 tokens for a model that takes 48).
    engine: Engine = tiny_engine(write_word_vocab(tmp_path))

    async def race() -> list[int]:
        lengths: list[int] = []
        untruncated: list[asyncio.Future[object]] = []
        # Short calls kept queued on the tokenizing thread keep it busy while the loop tokenizes.
        for _ in range(300):
            untruncated += [
                asyncio.ensure_future(engine.tokenize_off_loop(["a cat sat on the mat"], None, True)) for _ in range(20)
            ]
            lengths += [len(item) for item in engine.tokenize([SHORT], None, True)]
            await asyncio.sleep(0)
        await asyncio.gather(*untruncated)
        return lengths

    lengths = asyncio.run(race())
    assert len(lengths) > 100 and set(lengths) == {engine.max_length}
