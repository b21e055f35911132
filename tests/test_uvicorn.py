"""A real `deebert serve` process on loopback: HTTP semantics, and SIGTERM draining accepted work."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadtest.servers import deebert_server_command, free_port, server_process
from server.memory import find_allocator_library, loaded_allocator


@pytest.fixture
def server(tiny_checkpoint: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {"DEEBERT_MAX_WAIT_MS": "400", "DEEBERT_LOG_LEVEL": "warning"}
    with server_process(deebert_server_command(str(tiny_checkpoint), port), env, port, startup_timeout=60) as started:
        yield started


def test_real_server_answers_with_exit_layers_and_metrics_on_jemalloc(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    """HTTP semantics of a real process; and DEEBERT_ALLOCATOR=auto re-ran the command itself (same PID) with
    jemalloc preloaded, when there is one (one server start for both: each costs seconds)."""
    process, url = server
    full = httpx.post(f"{url}/v1/classify", json={"text": "good"}, headers={"X-Exit-Threshold": "0"}, timeout=10)
    early = httpx.post(f"{url}/v1/classify", json={"text": "good"}, headers={"X-Exit-Threshold": "1000"}, timeout=10)
    bad = httpx.post(f"{url}/v1/classify", content=b"{oops", headers={"content-type": "application/json"}, timeout=10)
    assert full.headers["X-Exit-Layer"] == "4" and early.headers["X-Exit-Layer"] == "1"
    assert bad.status_code == 400 and bad.json()["error_type"] == "malformed_json"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "deebert_layers_executed_total 5.0" in metrics and "deebert_layers_possible_total 8.0" in metrics
    expected = "jemalloc" if find_allocator_library("jemalloc") else "system"
    assert loaded_allocator(Path(f"/proc/{process.pid}/maps")) == expected
    assert f'allocator="{expected}"' in metrics


def test_serve_on_the_system_allocator_when_asked(tiny_checkpoint: Path) -> None:
    port = free_port()
    env = {"DEEBERT_ALLOCATOR": "system", "DEEBERT_LOG_LEVEL": "warning"}
    with server_process(deebert_server_command(str(tiny_checkpoint), port), env, port, startup_timeout=60) as (
        process,
        url,
    ):
        assert loaded_allocator(Path(f"/proc/{process.pid}/maps")) == "system"
        assert httpx.post(f"{url}/v1/classify", json={"text": "good"}, timeout=10).status_code == 200
        assert 'allocator="system"' in httpx.get(f"{url}/metrics", timeout=10).text


def test_sigterm_drains_accepted_requests_and_exits_zero(server: tuple[subprocess.Popen[bytes], str]) -> None:
    process, url = server
    with httpx.Client(timeout=20) as client, ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(client.post, f"{url}/v1/classify", json={"text": f"the movie {i}"}) for i in range(6)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until all six sit in the batcher's queue (400 ms window)
            page = httpx.get(f"{url}/metrics", timeout=5).text
            if "deebert_inflight_requests 6.0" in page:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    assert process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/classify", json={"text": "too late"}, timeout=5)
