"""schemathesis fuzzes every operation of /openapi.json against a real server: no 5xx, answers as documented."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import InProcessServer, base_settings

from inference.app import build_app

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_request_of_any_shape_breaks_the_api(engine, tmp_path):
    # Tiny answers keep a few thousand generated requests quick; the cache is off so each one really runs.
    server = InProcessServer(build_app(base_settings(max_tokens_limit=8), engine=engine))
    # Every check; the acceptance of schema-valid requests and the availability of created resources in forms that
    # know what a schema cannot say (fuzz_checks.py).
    command = [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks",
               "positive_data_acceptance,ensure_resource_availability", "--max-examples", "25", "--seed", "20261127",
               "--no-color"]
    hooks = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_checks", "PYTHONPATH": str(Path(__file__).parent)}
    try:
        server.wait_ready()
        # Once the model is loaded the document names its id and bounds token ids by its vocabulary, so the
        # generated requests reach generation rather than stopping at a 404 for an unknown model.
        # A stored response's operations answer 404 to any id but one just created: they run in a second pass, the
        # stateful one alone, where POST /v1/responses creates what they read, list and delete.
        runs = [subprocess.run(command + extra, cwd=tmp_path, env=hooks, capture_output=True, text=True, timeout=600)
                for extra in (["--exclude-path-regex", "^/v1/responses/"],
                              ["--include-path-regex", "^/v1/responses", "--phases", "stateful"])]
    finally:
        server.stop()
    followed = 0
    for result in runs:
        tail = result.stdout[-4000:]
        assert result.returncode == 0, tail
        assert "No issues found" in tail, tail
        # The stateful phase chains calls through the document's links (GET /v1/models -> GET /v1/models/{model},
        # POST /tokenize -> POST /detokenize, POST /v1/responses -> GET, DELETE, input_items): each pass follows
        # every link it selected, and the two passes all of them.
        links = re.search(r"API Links: +(\d+) covered / (\d+) selected / (\d+) total", result.stdout)
        assert links, result.stdout[-4000:]
        covered, selected, total = map(int, links.groups())
        assert covered == selected, links[0]
        followed += covered
    assert followed == total == 5, followed


def test_the_document_links_calls_a_client_can_chain(engine):
    import asyncio

    from conftest import call_asgi

    app = build_app(base_settings(), engine=engine)
    document = asyncio.run(call_asgi(app, "GET", "/openapi.json")).json()
    models = document["paths"]["/v1/models"]["get"]["responses"]["200"]["links"]["RetrieveModel"]
    assert models == {"operationId": "retrieve_model", "parameters": {"model": "$response.body#/data/0/id"}}
    tokens = document["paths"]["/tokenize"]["post"]["responses"]["200"]["links"]["Detokenize"]
    assert tokens == {"operationId": "detokenize", "requestBody": {"tokens": "$response.body#/tokens"}}
    stored = document["paths"]["/v1/responses"]["post"]["responses"]["200"]["links"]
    assert {name: link["operationId"] for name, link in stored.items()} == {
        "GetResponse": "retrieve_response", "ListInputItems": "list_input_items", "DeleteResponse": "delete_response"}
    assert all(link["parameters"] == {"response_id": "$response.body#/id"} for link in stored.values())
