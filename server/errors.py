"""The one error enum, and its one mapping to HTTP status and JSON `{"error", "error_type"}`."""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus

from pydantic import BaseModel, Field


class ErrorType(StrEnum):
    """Every way a request can fail; the value is the `error_type` clients see."""

    MALFORMED_JSON = "malformed_json"
    DUPLICATE_KEY = "duplicate_key"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION = "validation"
    EMPTY_INPUT = "empty_input"
    INVALID_TEXT = "invalid_text"
    TOO_MANY_TEXTS = "too_many_texts"
    INPUT_TOO_LONG = "input_too_long"
    INVALID_THRESHOLD = "invalid_threshold"
    UNKNOWN_PRESET = "unknown_preset"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    CLIENT_CLOSED_REQUEST = "client_closed_request"
    INTERNAL = "internal"

    @property
    def status(self) -> int:
        return STATUS[self]


STATUS: dict[ErrorType, int] = {
    ErrorType.MALFORMED_JSON: HTTPStatus.BAD_REQUEST,
    # RFC 8259 leaves a repeated name's meaning to the parser; we refuse to guess which value was meant.
    ErrorType.DUPLICATE_KEY: HTTPStatus.BAD_REQUEST,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    ErrorType.VALIDATION: HTTPStatus.UNPROCESSABLE_ENTITY,
    ErrorType.EMPTY_INPUT: HTTPStatus.UNPROCESSABLE_ENTITY,
    # Valid JSON that is not valid text: a \u escape decoding to half of a UTF-16 surrogate pair.
    ErrorType.INVALID_TEXT: HTTPStatus.UNPROCESSABLE_ENTITY,
    ErrorType.TOO_MANY_TEXTS: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorType.INPUT_TOO_LONG: HTTPStatus.UNPROCESSABLE_ENTITY,
    ErrorType.INVALID_THRESHOLD: HTTPStatus.UNPROCESSABLE_ENTITY,
    ErrorType.UNKNOWN_PRESET: HTTPStatus.UNPROCESSABLE_ENTITY,
    ErrorType.PAYLOAD_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorType.UNAUTHORIZED: HTTPStatus.UNAUTHORIZED,
    ErrorType.NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorType.METHOD_NOT_ALLOWED: HTTPStatus.METHOD_NOT_ALLOWED,
    ErrorType.OVERLOADED: HTTPStatus.TOO_MANY_REQUESTS,
    ErrorType.NOT_READY: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorType.SHUTTING_DOWN: HTTPStatus.SERVICE_UNAVAILABLE,
    # nginx's 499: the client went away before its answer; only metrics and logs ever see it.
    ErrorType.CLIENT_CLOSED_REQUEST: 499,
    ErrorType.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: str = Field(description="What went wrong and how to fix it")
    error_type: ErrorType = Field(description="Machine-readable error kind")


class DeeBertError(Exception):
    """An error a request ends with; raised anywhere below the routes, rendered in `error_handlers.py`."""

    def __init__(self, error_type: ErrorType, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.error_type.status

    def body(self) -> dict[str, str]:
        """The JSON body; a lone surrogate echoed from the request is written as its `\\uXXXX` escape, since it
        cannot be encoded as UTF-8 (rendering the error would otherwise fail with a 500)."""
        return {"error": printable(self.message), "error_type": self.error_type.value}


def printable(text: str) -> str:
    """`text` with every lone surrogate replaced by its backslash escape, so that it encodes as UTF-8."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def openapi_errors(*types: ErrorType) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` entries documenting the given error kinds per status."""
    by_status: dict[int, list[str]] = {}
    for error_type in types:
        by_status.setdefault(error_type.status, []).append(error_type.value)
    return {
        status: {"model": ErrorResponse, "description": "error_type: " + ", ".join(kinds)}
        for status, kinds in sorted(by_status.items())
    }
