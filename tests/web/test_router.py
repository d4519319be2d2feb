import asyncio

import pytest
from conftest import call_asgi

from inference.web.http import Request, Response, json_response
from inference.middleware.errors import errors
from inference.web.router import Route, Router, compile_template
from inference.web.state import state


async def hello(request: Request) -> Response:
    return json_response({"route": state(request.scope).route, "params": request.path_params})


APP = errors(Router([
    Route("GET", "/items", hello),
    Route("POST", "/items", hello),
    Route("GET", "/items/{item_id}", hello),
    Route("DELETE", "/items/{item_id}", hello),
    Route("GET", "/files/{rest:path}", hello),
]))


def run(method, path, **kw):
    return asyncio.run(call_asgi(APP, method, path, **kw))


def test_static_and_templated_routes_resolve_with_params_and_template():
    assert run("GET", "/items").json() == {"route": "/items", "params": {}}
    assert run("GET", "/items/42").json() == {"route": "/items/{item_id}", "params": {"item_id": "42"}}
    assert run("GET", "/files/a/b.txt").json()["params"] == {"rest": "a/b.txt"}


def test_one_segment_parameter_does_not_swallow_slashes():
    assert run("GET", "/items/1/2").status == 404


def test_unknown_path_is_a_json_404():
    result = run("GET", "/nope")
    assert result.status == 404
    assert result.json()["error"]["code"] == "not_found"
    assert result.headers["content-type"] == "application/json"


def test_wrong_method_is_405_with_allow():
    result = run("PUT", "/items/7")
    assert result.status == 405
    assert result.headers["allow"] == "DELETE, GET, HEAD"
    assert result.json()["error"]["code"] == "method_not_allowed"


def test_head_is_served_by_get_routes():
    assert run("HEAD", "/items").status == 200


@pytest.mark.parametrize("template, path, ok", [
    ("/a/{x}", "/a/b", True), ("/a/{x}", "/a/", False), ("/a/{x}", "/a/b/c", False), ("/a.b", "/aXb", False),
])
def test_templates_compile_to_exact_matches(template, path, ok):
    assert bool(compile_template(template).match(path)) is ok
