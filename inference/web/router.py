"""A tiny router: method + path template -> handler. Templates are compiled once, at build time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from .dialect import NATIVE, Dialect
from .errors import HTTPError
from .http import Receive, Request, Response, Scope, Send
from .state import state

Handler = Callable[[Request], Awaitable[Response]]
PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(:path)?}")


@dataclass(frozen=True)
class Route:
    """One endpoint. `template` uses `{name}` (one segment) or `{name:path}` (the rest of the path)."""

    method: str
    template: str
    handler: Handler
    summary: str = ""
    request_schema: type | None = None
    response_schema: type | None = None
    errors: tuple[int, ...] = ()
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # query parameter -> its JSON schema
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    allow_unknown_fields: bool = False
    limited: bool = False  # counted by the rate limiter (the inference endpoints)
    streams: bool = False  # answers text/event-stream when the request asks for "stream": true
    media_type: str = "application/json"
    include_in_schema: bool = True
    dialect: Dialect = NATIVE  # the shape of its error answers
    # OpenAPI links from this route's 200 answer: name -> ("METHOD /template" of the next call, the link's
    # `parameters` or `requestBody` with runtime expressions such as "$response.body#/data/0/id").
    links: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)


def compile_template(template: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in PARAM.finditer(template):
        pattern += re.escape(template[last : match.start()])
        pattern += f"(?P<{match[1]}>.+)" if match[2] else f"(?P<{match[1]}>[^/]+)"
        last = match.end()
    return re.compile(pattern + re.escape(template[last:]) + r"\Z")


class Router:
    """An ASGI app that dispatches to the first route whose template matches; 404 and 405 otherwise."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        # Paths under a dialect's mount that match no route still answer in that dialect (a 404 on /v1/...).
        self._mounts = {route.dialect.mount: route.dialect for route in routes if route.dialect.mount}
        # Static templates resolve with one dict lookup; only templated ones need a regex scan.
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        by_template: dict[str, dict[str, Route]] = {}
        for route in routes:
            methods = by_template.setdefault(route.template, {})
            methods[route.method] = route
            if route.method == "GET":
                methods.setdefault("HEAD", route)
        for template, methods in by_template.items():
            if PARAM.search(template):
                self._dynamic.append((compile_template(template), methods))
            else:
                self._static[template] = methods

    def match(self, path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        for pattern, methods in self._dynamic:
            found = pattern.match(path)
            if found:
                return methods, found.groupdict()
        return None

    def template_for(self, path: str) -> str | None:
        """The template of the routes `path` belongs to (for labelling requests refused before routing)."""
        found = self.match(path)
        return next(iter(found[0].values())).template if found else None

    def dialect_for(self, path: str) -> Dialect:
        """The dialect a request for `path` is answered in: its route's, else that of the mount it is under."""
        found = self.match(path)
        if found:
            return next(iter(found[0].values())).dialect
        for mount, dialect in self._mounts.items():
            if path.startswith(mount):
                return dialect
        return NATIVE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope["path"])
        if found is None:
            raise HTTPError(404, "not_found", f"no endpoint at {scope['path']}")
        methods, params = found
        route = methods.get(scope["method"])
        if route is None:
            allow = ", ".join(sorted(methods))
            raise HTTPError(
                405, "method_not_allowed", f"{scope['method']} is not allowed here; allowed: {allow}",
                headers={"Allow": allow},
            )
        # Telemetry labels spans and metrics with the template, never the raw path.
        request_state = state(scope)
        request_state.route, scope["path_params"] = route.template, params
        response = await route.handler(Request(scope, receive))
        await response(scope, receive, send)
