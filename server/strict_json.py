"""JSON bodies, strictly: a key given twice in one object is refused, not silently overwritten.

`StrictJsonRoute` is the route class of every route; FastAPI turns `parse_json_body`'s errors into
validation errors, which `error_handlers` renders as `duplicate_key` / `malformed_json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DuplicateKeyError(json.JSONDecodeError):
    """A JSON object names the same key twice (at any depth); json.loads would keep the last one silently."""


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_with_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Called by the C parser once per object; normal bodies hold one object, so this costs ~1 µs a request.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj


def parse_json_body(body: bytes) -> Any:
    """`json.loads`, except that an object with a repeated key raises DuplicateKeyError naming the key."""
    try:
        return json.loads(body, object_pairs_hook=_object_with_unique_keys)
    except _RepeatedKey as repeated:
        key = repeated.key if len(repeated.key) <= 60 else repeated.key[:60] + "..."
        message = f"duplicate key {key!r} in a JSON object; give each key once"
        raise DuplicateKeyError(message, body.decode("utf-8", "replace"), 0) from None


class StrictJsonRequest(Request):
    """A request whose JSON body is parsed by `parse_json_body` (FastAPI turns its errors into validation errors)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Routes whose handlers see a `StrictJsonRequest`; the body is still parsed exactly once."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler
