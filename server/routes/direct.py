"""The inference routes' direct lane: a well-formed POST to an inference path is answered here, before FastAPI.

Under load the event loop's own work per request is what the model's threads share the CPU with, and much of
it was FastAPI's machinery around the route, not the route: the router, its exception and exit-stack
wrappers and the dependency solver took about 40 % of the event loop's samples per request on a saturated
server (py-spy, BENCHMARKS.md §24). This lane does for a request that passes what FastAPI did for it, in the
same order, and then calls the same `respond` function as the route:

    the body parsed as strict JSON (`strict_json.parse_json_body`), when the Content-Type says JSON
    the API key (`dependencies.check_api_key`)
    the body validated into the route's request model
    the threshold header read (its first value, as FastAPI reads a single header)

A request that fails any step before the API key's (not JSON, not parsable) or the validation goes on to
FastAPI unchanged, whose route and error handlers answer it exactly as they always have: the lane never
writes an error of its own for those. Errors after that point (`DeeBertError`: the API key, limits, an unknown
preset, overload) are rendered by `error_handlers.error_response`, as FastAPI's handler for them does.
Everything else (other paths and methods, and every request behind a root path) goes on to FastAPI as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from server.error_handlers import error_response, is_json_content_type
from server.errors import DeeBertError
from server.middleware import ASGIApp, Receive, Scope, Send, replay
from server.protocol import CLASSIFY_PATH, TEI_PREDICT_PATHS, THRESHOLD_HEADER
from server.routes import classify, tei
from server.routes.dependencies import check_api_key
from server.state import ServerState
from server.strict_json import parse_json_body

Respond = Callable[[ServerState, Request, Any, str | None], Awaitable[Response]]

_THRESHOLD_HEADER = THRESHOLD_HEADER.lower().encode("latin-1")


@dataclass(frozen=True)
class DirectRoute:
    """One POST path the lane answers: its FastAPI route's body model (what the lane validates into), the
    route's `respond`, and the route itself (what the request metrics label it by)."""

    request_model: type[BaseModel]
    respond: Respond
    route: APIRoute


def _body_model(route: APIRoute) -> type[BaseModel]:
    """The pydantic model a route takes as its body."""
    model = route.body_field.field_info.annotation if route.body_field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise RuntimeError(f"POST {route.path} takes no pydantic body model: the direct lane cannot answer it")
    return model


def direct_routes(app: FastAPI) -> dict[str, DirectRoute]:
    """The inference routes by path: `POST /v1/classify` and TEI's predict paths."""
    responders: dict[str, Respond] = {CLASSIFY_PATH: classify.respond}
    responders.update((path, tei.respond) for path in TEI_PREDICT_PATHS)
    routes = {
        route.path: DirectRoute(_body_model(route), responders[route.path], route)
        for route in app.router.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and route.path in responders
    }
    missing = set(responders) - set(routes)
    if missing:
        raise RuntimeError(f"no FastAPI POST route for {sorted(missing)}: the direct lane answers only existing routes")
    return routes


class DirectLane:
    """ASGI middleware: answers the inference routes' well-formed requests itself, passes on the rest."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._routes: dict[str, DirectRoute] | None = None

    def routes(self, scope: Scope) -> dict[str, DirectRoute]:
        # Built at the first request, from the app Starlette puts in the scope (its routes are all added by then).
        if self._routes is None:
            self._routes = direct_routes(scope["app"])
        return self._routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = (
            self.routes(scope).get(scope["path"])
            # Behind a root path (uvicorn --root-path) Starlette routes on the path less its prefix: leave it to it.
            if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path")
            else None
        )
        if lane is None:
            await self.app(scope, receive, send)
            return
        threshold_header: str | None = None
        authorization: str | None = None
        content_type: str | None = None
        for name, value in scope["headers"]:
            if name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == _THRESHOLD_HEADER and threshold_header is None:
                threshold_header = value.decode("latin-1")
        message = await receive()
        receive = replay(message, receive)
        body = message.get("body", b"") if message["type"] == "http.request" and not message.get("more_body") else b""
        if not body or content_type is None or not is_json_content_type(content_type):
            await self.app(scope, receive, send)
            return
        try:
            document = parse_json_body(body)
        except Exception:
            await self.app(scope, receive, send)  # FastAPI's route says what is wrong with it
            return
        scope["route"] = lane.route
        request = Request(scope, receive)
        try:
            check_api_key(self.state, authorization)
            try:
                validated = lane.request_model.model_validate(document)
            except ValidationError:
                await self.app(scope, receive, send)  # FastAPI's route says what is wrong with it
                return
            response = await lane.respond(self.state, request, validated, threshold_header)
        except DeeBertError as err:
            response = error_response(err)
        await response(scope, receive, send)
