"""Benchmark servers' lifecycle: start a server as a subprocess on a free loopback port, wait until it is
ready, stop it with SIGTERM; the commands of `deebert serve` and of the plain baselines (`deebert bench`,
`deebert reliability` and the tests start their servers through here).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A server would not start or the bench cannot go on."""


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Inherited DEEBERT_* settings would silently change what is measured; the bench sets its own. Where graphs
# and tunes are cached, and whether a server without a cached tune tunes at start, pass through (the tests
# set both for every server they start).
INHERITED_SETTINGS = ("DEEBERT_CACHE_DIR", "DEEBERT_TUNE_BUDGET_S")


def _server_env(extra: dict[str, str], root: Path = REPO_ROOT) -> dict[str, str]:
    """The environment of a server run from the source tree `root`: its code first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEBERT_") or k in INHERITED_SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def deebert_server_command(checkpoint: str, port: int) -> list[str]:
    """argv of `deebert serve` on loopback."""
    return [sys.executable, "-m", "deebert", "serve", "--checkpoint", checkpoint, "--port", str(port)]


def plain_server_command(
    checkpoint: str, port: int, threads: int | None, backend: str = "torch", precision: str = "fp32"
) -> list[str]:
    """argv of the plain baseline: transformers (`torch`; `precision` bf16 loads it in bfloat16), or the plain
    graph on ONNX Runtime (fp32 fused, or dynamic int8) or OpenVINO (fp32 or bf16)."""
    argv = [sys.executable, "-m", "loadtest.baselines.plain_server", "--checkpoint", checkpoint, "--port", str(port)]
    argv += ["--backend", backend]
    if backend == "torch" and precision == "bf16":
        argv += ["--dtype", "bfloat16"]
    elif backend != "torch":
        argv += ["--precision", precision]
    return argv + (["--threads", str(threads)] if threads else [])


def plain_variant_server(variant: dict[str, Any]) -> tuple[str, str]:
    """(backend, precision) of the plain server that runs a peers-run plain variant as measured (OpenVINO's
    default precision is the one it used there)."""
    backend, precision = variant["runtime"], variant["precision"]
    if precision == "default":
        used = str(variant.get("precision_used") or "")
        precision = "bf16" if "bf16" in used or "bfloat16" in used else "fp32"
    return backend, precision


@contextlib.contextmanager
def server_process(
    argv: list[str],
    env: dict[str, str],
    port: int,
    startup_timeout: float,
    log_path: Path | None = None,
    source: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a server subprocess, wait for /health/ready, yield it and its URL; SIGTERM it afterwards. Its output
    goes to `log_path` when given (kept), else to a temporary file. `source`: run this source tree's code (a
    `git worktree` of another commit) instead of this checkout's."""
    url = f"http://127.0.0.1:{port}"
    opened = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115
    root = source.resolve() if source is not None else REPO_ROOT
    with opened as log:
        process = subprocess.Popen(argv, env=_server_env(env, root), cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, url, startup_timeout, log)
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


@contextlib.contextmanager
def running_server(argv: list[str], env: dict[str, str], port: int, startup_timeout: float) -> Iterator[str]:
    """`server_process` when only the URL is needed."""
    with server_process(argv, env, port, startup_timeout) as (_, url):
        yield url


def _log_tail(log: Any, limit: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return bytes(log.read()).decode(errors="replace")[-limit:]


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{shlex.join(process.args)} exited with {process.returncode}:\n{_log_tail(log)}")  # type: ignore[arg-type]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"server at {url} was not ready after {timeout:g} s:\n{_log_tail(log)}")


def model_info(url: str) -> dict[str, Any]:
    """GET /v1/model of a running server."""
    response = httpx.get(f"{url}/v1/model", timeout=10)
    response.raise_for_status()
    return dict(response.json())
