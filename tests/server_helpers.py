"""Running the app on a tiny model: in-process (httpx ASGITransport + the real lifespan), or under real uvicorn."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from hypothesis import strategies as st

from model.config import Preset
from model.tokenization import load_tokenizer
from server.app import create_app
from server.engine import Engine
from server.serve import http_server
from server.settings import ServerSettings
from tests.helpers import tiny_model, write_vocab

# Characters of every Unicode category, lone surrogates (Cs) included: hypothesis' default text leaves them
# out, though a JSON body can spell one (`"\\ud800"`). Send them with json.dumps (ASCII, so escaped).
EVERY_CATEGORY = st.characters(codec=None, exclude_categories=())

PRESETS = [Preset("lossless", 0.05, 1.0, 0.1), Preset("balanced", 0.2, 0.9, 0.3), Preset("fast", 0.5, 0.8, 0.6)]


def tiny_engine(tokenizer_dir: Any, pair: bool = False, **model_options: Any) -> Engine:
    columns = ("sentence1", "sentence2") if pair else ("sentence",)
    model = tiny_model("bert", text_columns=columns, **model_options)
    model.config = model.config.with_presets(PRESETS)
    return Engine(model, load_tokenizer(tokenizer_dir), device=__import__("torch").device("cpu"))


def settings(**overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {"checkpoint": "unused", "warmup": False, "max_wait_ms": 0.0}
    values.update(overrides)
    return ServerSettings(**values)


@asynccontextmanager
async def serving(app: FastAPI, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        if wait_ready:
            await app.state.deebert.preparing
            assert app.state.deebert.ready, app.state.deebert.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://deebert.test") as client:
            yield client


def make_app(engine: Engine, **overrides: Any) -> FastAPI:
    return create_app(settings(**overrides), engine)


@contextmanager
def uvicorn_serving(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn server on a free loopback port (in a thread), ready; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = http_server(app, uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started or httpx.get(f"{url}/health/ready", timeout=5).status_code != 200:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not become ready"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def write_word_vocab(directory: Path) -> Path:
    """A tokenizer directory whose vocabulary holds every word of `tests.helpers.WORDS`, one id each (so that
    which words a truncation keeps is visible in the ids)."""
    write_vocab(directory)
    return directory
