"""`deebert serve`: settings from flags and `DEEBERT_*`, fail-fast model load, uvicorn with a graceful drain."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from server.memory import (
    AllocatorError,
    bound_kernel_cache,
    limit_malloc_arenas,
    loaded_allocator,
    plan_allocator,
    reexec,
)
from server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("deebert.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`--max-batch-size` for DEEBERT_MAX_BATCH_SIZE); flags win over the environment."""
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} [env DEEBERT_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    return ServerSettings(**given)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns 503 at once, then uvicorn's graceful shutdown lets accepted work finish."""

    def __init__(self, config: uvicorn.Config, on_signal: Any) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after shutdown (exit status -15); a completed drain is a
        # clean exit, so orchestrators see 0.
        self._captured_signals.clear()


def http_server(app: FastAPI, config: uvicorn.Config, on_signal: Any = None) -> DrainingServer:
    """uvicorn's server for the app, with the app's batcher counting the requests uvicorn has accepted (its request
    tasks, made as each request's head is read): a request whose task has not run yet is in flight too
    (`server.state.requests_in_flight`). `on_signal`: called first on SIGTERM/SIGINT (readiness turns 503)."""
    server = DrainingServer(config, on_signal or (lambda: None))
    tasks = server.server_state.tasks
    app.state.deebert.accepted_requests = tasks.__len__
    return server


def serve(settings: ServerSettings, allocator_note: str = "") -> int:
    # The model and web stack are imported here, not at the top: `run_from_args` switches the allocator by
    # re-running the process, which should happen before torch and transformers are imported (seconds).
    from server.app import create_app
    from server.engine import Engine, EngineLoadError
    from server.state import make_brownout

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allocator = loaded_allocator()
    if allocator_note:
        logger.warning("memory allocator: %s", allocator_note)
    logger.info("memory allocator: %s", allocator)
    if allocator == "system" and settings.malloc_arenas:
        limit_malloc_arenas(settings.malloc_arenas)  # before the model and the threads allocate
    logger.debug("oneDNN kernel cache capacity %s", bound_kernel_cache())
    try:
        engine = Engine.load(settings)
    except EngineLoadError as err:
        logger.error("%s", err)
        return 2
    try:
        make_brownout(settings, engine)  # a bad brownout threshold fails here, not as a server never ready
    except ValueError as err:
        logger.error("%s", err)
        return 2
    app = create_app(settings, engine)
    state = app.state.deebert

    def start_draining() -> None:
        state.draining = True
        logger.info("signal received: draining (readiness now 503)")

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        access_log=settings.log_level == "debug",
    )
    server = http_server(app, config, start_draining)
    server.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deebert serve", description="Serve a DeeBERT checkpoint over HTTP.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Build the settings from parsed flags (exit 2 naming a bad one) and serve."""
    try:
        settings = settings_from(args)
    except Exception as err:  # pydantic ValidationError: say which setting is wrong
        print(f"deebert serve: invalid settings: {err}", file=sys.stderr)
        return 2
    # The allocator has to be in place before anything is allocated: switching means running again.
    try:
        plan = plan_allocator(settings.allocator, os.environ)
    except AllocatorError as err:
        print(f"deebert serve: {err}", file=sys.stderr)
        return 2
    if plan.needs_reexec:
        reexec(plan.environment)
    return serve(settings, plan.note)
