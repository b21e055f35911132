"""Schemathesis against the server's own OpenAPI schema (bounded, CI-safe): no 5xx, responses match it.

Every string in a generated body may be swapped for one drawn from every Unicode category, lone surrogates
included: schemathesis (like hypothesis' default text) leaves those out, yet a JSON body can spell one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loadtest.servers import deebert_server_command, free_port, running_server
from model.checkpoint import save_model
from model.config import Preset
from tests.helpers import tiny_model, write_vocab
from tests.server_helpers import EVERY_CATEGORY


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("fuzz-checkpoint")
    tokenizer = write_vocab(directory)
    model = tiny_model("bert")
    model.config = model.config.with_presets([Preset("balanced", 0.2, 0.9, 0.3)])
    save_model(model, directory, tokenizer=tokenizer)
    port = free_port()
    env = {"DEEBERT_LOG_LEVEL": "warning", "DEEBERT_MAX_TEXTS_PER_REQUEST": "16"}
    with running_server(deebert_server_command(str(directory), port), env, port, startup_timeout=60) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    loaded.hooks.register_hook_with_name(_strings_of_every_category, "flatmap_body")
    return loaded


def _strings_of_every_category(_context: Any, body: Any) -> st.SearchStrategy[Any]:
    """The generated body, with each string kept or replaced by text of every Unicode category (this schema only;
    schemathesis sends JSON with json.dumps, so a lone surrogate travels as its \\u escape)."""
    return _swap_strings(body)


# Every category, with lone surrogates drawn far more often than their share of code points would give.
ANY_TEXT = st.text(alphabet=st.one_of(EVERY_CATEGORY, st.characters(categories=["Cs"])), min_size=1, max_size=16)


def _swap_strings(value: Any) -> st.SearchStrategy[Any]:
    if isinstance(value, str):
        return st.one_of(st.just(value), ANY_TEXT)
    if isinstance(value, list):
        return st.tuples(*map(_swap_strings, value)).map(list)
    if isinstance(value, dict):
        return st.fixed_dictionaries({key: _swap_strings(item) for key, item in value.items()})
    return st.just(value)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_survives_generated_requests(case: schemathesis.Case) -> None:
    # No 5xx, and every response (errors included) is documented and matches its schema. Schema-valid
    # thresholds can still be refused (an unknown preset name), so "positive data acceptance" is not asked.
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
