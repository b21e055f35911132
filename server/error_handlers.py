"""Errors → HTTP responses, the one place: every failure becomes `{"error", "error_type"}` with the enum's status.

`DeeBertError` carries its `ErrorType`; FastAPI's own failures (validation, 404, 405, unparsable bodies) are
translated into the same enum here. Unexpected exceptions are answered by `middleware.UnexpectedErrorMiddleware`
with `error_response` too.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import DeeBertError, ErrorType
from server.strict_json import DuplicateKeyError


def error_response(err: DeeBertError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The response for an error: its enum's status, the JSON body, and its headers (Retry-After, ...)."""
    return JSONResponse(err.body(), status_code=err.status, headers=headers if headers is not None else err.headers)


def validation_error(request: Request, exc: RequestValidationError) -> DeeBertError:
    """What a request that failed FastAPI's parsing or validation did wrong, as one of our error types."""
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if isinstance(exc.__cause__, DuplicateKeyError):
        return DeeBertError(ErrorType.DUPLICATE_KEY, exc.__cause__.msg)
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx: dict[str, Any] = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
        return DeeBertError(
            ErrorType.MALFORMED_JSON, f"request body is not valid JSON ({ctx.get('error', 'parse error')})"
        )
    if request.method == "POST" and not is_json_content_type(content_type):
        sent = f"not {content_type[:80]!r}" if content_type else "none was sent"
        return DeeBertError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE, f"send the body as JSON with Content-Type: application/json ({sent})"
        )
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return DeeBertError(ErrorType.EMPTY_INPUT, 'request body is empty; send a JSON object such as {"text": "..."}')
    if any("threshold" in map(str, e.get("loc", ())) for e in errors):
        return DeeBertError(ErrorType.INVALID_THRESHOLD, _threshold_rule(request))
    parts = []
    for e in errors[:3]:
        location = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return DeeBertError(ErrorType.VALIDATION, "; ".join(parts) + more)


def _threshold_rule(request: Request) -> str:
    """What a threshold must be, in the terms of the served checkpoint's exit criterion (once it is loaded)."""
    engine = request.app.state.deebert.engine
    if engine is None:
        return "threshold must be a number or a preset name"
    criterion = engine.config.criterion
    return (
        f"threshold must be a preset name or a number: this model's exit criterion is {criterion.name}, "
        f"{criterion.meaning}"
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path. Starlette's own `Allow` names only the first
    route that matched the path, and `/` has two: POST (TEI's predict) and GET (TEI's health)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods.update(route.methods or ())
    return ", ".join(sorted(methods))


def is_json_content_type(content_type: str) -> bool:
    """Whether a Content-Type is JSON, as FastAPI decides it: application/json or application/*+json."""
    main = content_type.split(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    """Render our errors, FastAPI's validation errors and Starlette's HTTP errors through `error_response`."""

    @app.exception_handler(DeeBertError)
    async def _deebert(_: Request, exc: DeeBertError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(DeeBertError(ErrorType.NOT_FOUND, f"no route {request.url.path}"))
        if exc.status_code == 405:
            error = DeeBertError(ErrorType.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")
            return error_response(error, headers={"Allow": _allowed_methods(request)})
        if exc.status_code == 400:
            # FastAPI's own 400: a body that is not UTF-8, or JSON nested too deeply to parse.
            return error_response(
                DeeBertError(ErrorType.MALFORMED_JSON, "request body could not be parsed: send UTF-8 JSON")
            )
        kind = ErrorType.INTERNAL if exc.status_code >= 500 else ErrorType.VALIDATION
        return JSONResponse(DeeBertError(kind, str(exc.detail)).body(), status_code=exc.status_code)
