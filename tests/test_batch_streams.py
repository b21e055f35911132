"""Batch streams: how many batches the engine lets run at once under load, on which copy of the model, and a
server whose batches run side by side answering as one batch at a time does."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from model.tokenization import load_tokenizer
from server.engine import DEFAULT_STREAMS, Engine, batch_streams
from tests.helpers import tiny_model
from tests.server_helpers import PRESETS, make_app, serving

CPU = torch.device("cpu")


class CopyingModel:
    """What `batch_streams` asks of a model: its backend's name and precision, and a stream copy."""

    backend = "onnxruntime"
    precision = "float32"

    def __init__(self, has_copy: bool = True) -> None:
        self.has_copy = has_copy
        self.copied_with: list[int] = []

    def stream_copy(self, threads: int) -> object | None:
        self.copied_with.append(threads)
        return f"copy on {threads}" if self.has_copy else None


@pytest.mark.parametrize(
    ("setting", "threads", "expected", "copy_threads"),
    [
        (None, 4, DEFAULT_STREAMS, [2]),  # the default: two streams, the threads divided between them
        (None, 2, DEFAULT_STREAMS, [1]),
        (None, 1, 1, []),  # one thread: nothing to divide
        (3, 2, 3, [1]),  # more streams than threads: one thread each
        (1, 8, 1, []),  # turned off
    ],
)
def test_streams_and_their_threads_on_the_cpu(
    setting: int | None, threads: int, expected: int, copy_threads: list[int]
) -> None:
    model = CopyingModel()
    streams, copy = batch_streams(model, CPU, setting, threads)  # type: ignore[arg-type]
    assert streams == expected
    assert copy == (f"copy on {copy_threads[0]}" if copy_threads else None)
    assert model.copied_with == copy_threads


def test_one_stream_on_a_gpu_and_where_the_backend_has_no_copy(caplog: pytest.LogCaptureFixture) -> None:
    assert batch_streams(CopyingModel(), torch.device("cuda"), 2, 4) == (1, None)
    with caplog.at_level(logging.INFO, logger="deebert.engine"):
        assert batch_streams(CopyingModel(has_copy=False), CPU, None, 2) == (1, None)
        assert batch_streams(CopyingModel(has_copy=False), CPU, 2, 2) == (1, None)  # type: ignore[arg-type]
    levels = [record.levelno for record in caplog.records if "one at a time" in record.getMessage()]
    assert levels == [logging.INFO, logging.WARNING], "asked for streams explicitly: a warning"
    assert tiny_model("bert").stream_copy(1) is None, "torch's threads are the process's: no copy"


def test_an_engine_without_a_copy_refuses_streams(tokenizer_dir: Path) -> None:
    from server.engine import EngineLoadError

    with pytest.raises(EngineLoadError, match="stream copy"):
        Engine(tiny_model("bert"), load_tokenizer(tokenizer_dir), CPU, streams=2)


@pytest.mark.anyio
async def test_a_server_with_streams_answers_as_one_batch_at_a_time(tokenizer_dir: Path) -> None:
    """Concurrent requests: the backlog runs on the stream copy, and every text's answer is the one it gets alone;
    /v1/model and the runtime's info metric say how many streams."""
    model = tiny_model("bert")
    model.config = model.config.with_presets(PRESETS)
    engine = Engine(model, load_tokenizer(tokenizer_dir), CPU, stream_model=model, streams=2)
    run_batch = engine.run_batch
    on_streams: list[int] = []

    def counting(items: list[Any], thresholds: list[float], on_exit: Any, stream: bool = False) -> None:
        if stream:
            on_streams.append(len(items))
        run_batch(items, thresholds, on_exit, stream)

    engine.run_batch = counting  # type: ignore[method-assign]
    texts = [f"the movie was {'good ' * (n % 5)}and {'bad ' * (n % 3)}" for n in range(48)]
    async with serving(make_app(engine, max_batch_size=4)) as client:
        # Together first: in process, once lone texts are known to be quick, each request would run at once.
        together = await asyncio.gather(*(client.post("/v1/classify", json={"text": text}) for text in texts))
        alone = []
        for text in texts:
            response = await client.post("/v1/classify", json={"text": text})
            assert response.status_code == 200
            alone.append(response.json())
        info = (await client.get("/v1/model")).json()
        metrics = (await client.get("/metrics")).text
    assert on_streams, "the backlog ran on the streams"
    for response, expected in zip(together, alone, strict=True):
        assert response.status_code == 200
        got, wanted = response.json()["results"][0], expected["results"][0]
        assert (got["label"], got["exit_layer"]) == (wanted["label"], wanted["exit_layer"])
        assert got["score"] == pytest.approx(wanted["score"], abs=1e-4)
    assert info["batch_streams"] == 2
    assert 'batch_streams="2"' in metrics


def test_the_benchmark_runs_one_batch_at_a_time_and_streams_and_writes_its_report(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`python -m benchmarks.batch_streams` on a tiny checkpoint on ONNX Runtime, in a process of its own (its
    sessions need pools of their own, which a process decides at its first session)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    from tests.helpers import sentiment_rows, write_tsv

    rows = [[text + " and then" * (i % 7), label] for i, (text, label) in enumerate(sentiment_rows(40))]
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], rows)
    output = tmp_path / "streams.json"
    command = [sys.executable, "-m", "benchmarks.batch_streams", "--checkpoint", str(tiny_checkpoint)]
    command += ["--data", str(data), "--backend", "onnxruntime", "--threads", "2", "--streams", "1,2", "--rounds", "2"]
    command += ["--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--output", str(output), "--no-progress"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(output.read_text())
    assert report["backend"] == "onnxruntime" and report["threads"] == 2 and report["texts"] == 40
    assert len(report["rounds"]) == 2 and all(set(figures) == {"1", "2"} for figures in report["rounds"])
    assert report["summary"]["streams_1_texts_per_s"] > 0 and report["summary"]["streams_2_texts_per_s"] > 0
    assert "| 2 at once, the stream copy | 1 |" in done.stdout
