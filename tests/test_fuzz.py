"""Schemathesis against the server's own OpenAPI schema (bounded, CI-safe): no 5xx, responses match it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loadtest.bench import deebert_server_command, free_port, running_server
from model.config import Preset
from tests.helpers import tiny_model, write_vocab


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("fuzz-checkpoint")
    tokenizer = write_vocab(directory)
    model = tiny_model("bert")
    model.config = model.config.with_presets([Preset("balanced", 0.2, 0.9, 0.3)])
    model.save_pretrained(directory, tokenizer=tokenizer)
    port = free_port()
    env = {"DEEBERT_LOG_LEVEL": "warning", "DEEBERT_MAX_TEXTS_PER_REQUEST": "16"}
    with running_server(deebert_server_command(str(directory), port), env, port, startup_timeout=60) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_survives_generated_requests(case: schemathesis.Case) -> None:
    # No 5xx, and every response (errors included) is documented and matches its schema. Schema-valid
    # thresholds can still be refused (an unknown preset name), so "positive data acceptance" is not asked.
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
