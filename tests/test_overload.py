"""Overload, short version: a real server pushed far past its queue answers only 2xx or 429, and recovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from loadtest.generator import LoadConfig, Workload, run
from loadtest.servers import deebert_server_command, free_port, running_server
from model.checkpoint import save_model
from model.config import Preset
from tests.helpers import sentiment_rows, tiny_model, write_tsv


def test_overload_gets_only_2xx_and_429_and_the_server_recovers(tmp_path: Path, tokenizer: Any) -> None:
    model = tiny_model("bert")
    model.config = model.config.with_presets([Preset("balanced", 0.2, 0.9, 0.3)])
    checkpoint = tmp_path / "tiny"
    save_model(model, checkpoint, tokenizer=tokenizer)
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(40))
    # A queue of 8 texts and requests of 6: a second request that arrives while one waits is refused.
    env = {"DEEBERT_MAX_QUEUE_SIZE": "8", "DEEBERT_MAX_BATCH_SIZE": "2", "DEEBERT_MAX_WAIT_MS": "0"}
    port = free_port()
    with running_server(deebert_server_command(str(checkpoint), port), env, port, startup_timeout=60) as url:
        report = run(
            LoadConfig(url=url, rate=300, duration=1.0, texts_per_request=6, threshold="0", progress=False),
            Workload.from_file(data),
        )
        ready = httpx.get(f"{url}/health/ready", timeout=5)
        after = httpx.post(f"{url}/v1/classify", json={"text": "still good"}, timeout=5)
        page = httpx.get(f"{url}/metrics", timeout=5).text
    assert report["requests_ok"] > 0, report
    assert set(report["errors"]) == {"429"}, f"only 429 may be refused under overload: {report['errors']}"
    assert report["requests_ok"] + report["errors"]["429"] == report["requests_sent"], "no request may be lost"
    assert ready.status_code == 200 and after.status_code == 200
    assert "deebert_queue_depth 0.0" in page and "deebert_inflight_requests 0.0" in page
    assert 'deebert_requests_total{route="/v1/classify",status="429"}' in page
