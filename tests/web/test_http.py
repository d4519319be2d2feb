"""Body limits, JSON parsing and validation errors, driven through the real app without a server."""

import asyncio
import json

import pytest
from conftest import base_settings, call_asgi

from inference.app import build_app

LIMIT = 2048


@pytest.fixture(scope="module")
def app(engine):
    # No lifespan here: the service stays "loading", so only the checks before generation are exercised.
    return build_app(base_settings(max_body_bytes=LIMIT, max_tokens_limit=256, n_ctx=1024), engine=engine)


def post(app, body, headers=None):
    headers = headers if headers is not None else [("content-type", "application/json")]
    return asyncio.run(call_asgi(app, "POST", "/api/v1/infer", body=body, headers=headers))


def error_of(result):
    body = result.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "request_id"} <= set(body["error"])
    return body["error"]


def test_declared_oversized_body_is_413_before_reading(app):
    result = post(app, b"{}", headers=[("content-length", str(LIMIT + 1))])
    assert result.status == 413
    assert error_of(result)["code"] == "request_too_large"


def test_body_larger_than_its_content_length_claims_is_413(app):
    chunks = [b'{"prompt": "' + b"x" * 1000, b"y" * 1000, b"z" * 1000 + b'"}']
    result = post(app, chunks, headers=[("content-length", "10")])
    assert result.status == 413


def test_chunked_body_without_length_is_413(app):
    result = post(app, [b"x" * 1500, b"x" * 1500], headers=[])
    assert result.status == 413


@pytest.mark.parametrize("raw, fragment", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"prompt": NaN}', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 40 + b"]" * 40, "nested more than"),
    (b"[" * 1000 + b"]" * 1000, "nested"),
])
def test_malformed_or_absurdly_nested_json_is_400(app, raw, fragment):
    result = post(app, raw)
    assert result.status == 400
    error = error_of(result)
    assert error["code"] == "invalid_json"
    assert fragment in error["message"]


@pytest.mark.parametrize("body, fields", [
    ({}, ["prompt"]),
    ({"prompt": ""}, ["prompt"]),
    ({"prompt": 5}, ["prompt"]),
    ({"prompt": "hi", "max_tokens": 0}, ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": 257}, ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": "10"}, ["max_tokens"]),
    ({"prompt": "hi", "temperature": 2.5, "top_p": 0}, ["temperature", "top_p"]),
    ({"prompt": "hi", "temperature": True}, ["temperature"]),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, ["stop"]),
    ({"prompt": "hi", "stop": [""]}, ["stop[0]"]),
    ({"prompt": "hi", "seed": 1.5}, ["seed"]),
    ({"prompt": "hi", "promt": "typo"}, ["promt"]),
])
def test_each_bad_field_is_named_in_a_422(app, body, fields):
    result = post(app, json.dumps(body).encode())
    assert result.status == 422
    error = error_of(result)
    assert error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == fields
    assert error["field"] == fields[0]


def test_non_object_body_is_422(app):
    result = post(app, b"[1, 2]")
    assert result.status == 422
    assert "JSON object" in error_of(result)["message"]


def test_valid_request_before_the_model_is_ready_is_503_with_retry_after(app):
    result = post(app, b'{"prompt": "hi"}')
    assert result.status == 503
    assert result.headers["retry-after"] == "5"
    assert error_of(result)["code"] == "model_not_ready"


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(app):
    ok = asyncio.run(call_asgi(app, "GET", "/health", headers=[("x-request-id", "abc-123")]))
    assert ok.headers["x-request-id"] == "abc-123"
    bad = asyncio.run(call_asgi(app, "GET", "/health", headers=[("x-request-id", "a b\tc")]))
    assert bad.headers["x-request-id"] != "a b\tc"
    assert len(bad.headers["x-request-id"]) == 32


def test_openapi_limits_come_from_settings(app):
    doc = asyncio.run(call_asgi(app, "GET", "/openapi.json")).json()
    schema = doc["components"]["schemas"]["InferRequest"]
    assert schema["properties"]["max_tokens"]["maximum"] == 256
    assert schema["required"] == ["prompt"]
    assert set(doc["paths"]) >= {"/", "/health", "/ready", "/api/v1/model", "/api/v1/infer", "/openapi.json", "/docs"}


def test_docs_and_playground_are_opt_in(engine):
    """DOCS_ENABLED=false (the cluster's setting): Swagger UI, the OpenAPI document and the playground do not exist,
    and the index does not link them; the API, probes and metrics stay."""
    app = build_app(base_settings(docs_enabled=False), engine=engine)
    for path in ("/docs", "/docs/swagger-ui.css", "/openapi.json", "/playground"):
        result = asyncio.run(call_asgi(app, "GET", path))
        assert result.status == 404, path
    for path in ("/health", "/metrics"):
        assert asyncio.run(call_asgi(app, "GET", path)).status == 200, path
    links = asyncio.run(call_asgi(app, "GET", "/")).json()["links"]
    assert not {"docs", "openapi", "playground"} & set(links)
    opened = build_app(base_settings(), engine=engine)
    assert asyncio.run(call_asgi(opened, "GET", "/openapi.json")).status == 200
