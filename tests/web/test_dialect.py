"""Errors follow the dialect of the route they happen on (and of the mount a path falls under), not a path prefix."""

import asyncio

from conftest import call_asgi

from inference.api.openai.dialect import OPENAI
from inference.middleware.errors import errors
from inference.web.dialect import NATIVE, Dialect, ErrorResponse
from inference.web.errors import HTTPError
from inference.web.http import Request, Response
from inference.web.router import Route, Router


async def invalid(request: Request) -> Response:
    raise HTTPError(422, "validation_error", "size: must be at least 1", field="size")


SHOUTING = Dialect("shouting", ErrorResponse, lambda error, request_id: {"ERROR": error.code.upper()},
                   lambda error: 418, mount="/loud/")
ROUTER = Router([
    Route("POST", "/native", invalid),
    Route("POST", "/elsewhere/openai", invalid, dialect=OPENAI),  # OpenAI's shape away from /v1/
    Route("POST", "/v1/native-here", invalid),  # the native shape under /v1/: the route decides
    Route("POST", "/loud/thing", invalid, dialect=SHOUTING),
])
APP = errors(ROUTER, dialect_of=ROUTER.dialect_for)


def run(method, path):
    return asyncio.run(call_asgi(APP, method, path, b"{}", [("content-type", "application/json")]))


def test_a_routes_errors_are_in_its_dialect_wherever_it_is_mounted():
    native = run("POST", "/native")
    assert native.status == 422 and native.json()["error"]["field"] == "size" and "request_id" in native.json()["error"]
    openai = run("POST", "/elsewhere/openai")
    assert openai.status == 400  # OpenAI says 400 for every invalid parameter
    assert openai.json() == {"error": {"message": "size: must be at least 1", "type": "invalid_request_error",
                                       "param": "size", "code": "validation_error"}}
    assert run("POST", "/v1/native-here").json()["error"]["code"] == "validation_error"
    assert run("POST", "/v1/native-here").status == 422
    assert run("POST", "/loud/thing").status == 418 and run("POST", "/loud/thing").json() == {"ERROR": "VALIDATION_ERROR"}


def test_a_path_no_route_matches_answers_in_the_dialect_of_its_mount():
    assert ROUTER.dialect_for("/v1/nothing") is OPENAI  # a route of the OpenAI dialect mounts /v1/
    assert ROUTER.dialect_for("/loud/nothing") is SHOUTING
    assert ROUTER.dialect_for("/nothing") is NATIVE
    missing = run("GET", "/loud/nothing")
    assert missing.status == 418 and missing.json() == {"ERROR": "NOT_FOUND"}
    assert run("GET", "/v1/nothing").json()["error"]["type"] == "invalid_request_error"
