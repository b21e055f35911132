"""What routes depend on: the server state (from `request.app.state`), the API-key checks, and the header
that sets a request's threshold."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from server.errors import DeeBertError, ErrorType, openapi_errors
from server.protocol import THRESHOLD_HEADER
from server.state import ServerState

# async on purpose, every dependency here: FastAPI runs a plain `def` dependency in a worker thread.


async def server_state(request: Request) -> ServerState:
    """The app's `ServerState`."""
    return request.app.state.deebert  # type: ignore[no-any-return]


State = Annotated[ServerState, Depends(server_state)]
Authorization = Annotated[str | None, Header(include_in_schema=False)]
ThresholdHeader = Annotated[
    str | None,
    Header(
        alias=THRESHOLD_HEADER,
        description="threshold for this request, of the model's exit criterion (DeeBERT entropy: a number >= 0, "
        "0 = full depth) or a preset name; the body's `threshold` wins over it",
    ),
]


def check_api_key(state: ServerState, authorization: str | None) -> None:
    """401 unless `Authorization: Bearer <DEEBERT_API_KEY>` (when a key is set)."""
    expected = state.settings.api_key
    if expected is None:
        return
    token = ""
    if authorization and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise DeeBertError(
            ErrorType.UNAUTHORIZED,
            "missing or wrong API key; send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )


async def require_api_key(state: State, authorization: Authorization = None) -> None:
    """Inference routes: the API key, when one is set."""
    check_api_key(state, authorization)


# Health and metrics are exempt from the API key unless configured: probes and scrapers rarely hold secrets.
async def require_api_key_for_health(state: State, authorization: Authorization = None) -> None:
    """Health routes: the API key when DEEBERT_API_KEY_HEALTH is set."""
    if state.settings.api_key_health:
        check_api_key(state, authorization)


async def require_api_key_for_metrics(state: State, authorization: Authorization = None) -> None:
    """GET /metrics: the API key when DEEBERT_API_KEY_METRICS is set."""
    if state.settings.api_key_metrics:
        check_api_key(state, authorization)


INFERENCE_ERRORS = openapi_errors(
    ErrorType.MALFORMED_JSON,
    ErrorType.DUPLICATE_KEY,
    ErrorType.UNAUTHORIZED,
    ErrorType.TOO_MANY_TEXTS,
    ErrorType.UNSUPPORTED_MEDIA_TYPE,
    ErrorType.VALIDATION,
    ErrorType.EMPTY_INPUT,
    ErrorType.INVALID_TEXT,
    ErrorType.INPUT_TOO_LONG,
    ErrorType.INVALID_THRESHOLD,
    ErrorType.UNKNOWN_PRESET,
    ErrorType.PAYLOAD_TOO_LARGE,
    ErrorType.OVERLOADED,
    ErrorType.NOT_READY,
    ErrorType.SHUTTING_DOWN,
)
