"""schemathesis fuzzes every operation of /openapi.json against a real server: no 5xx, answers as documented."""

import subprocess
import sys
from pathlib import Path

from conftest import InProcessServer, base_settings

from inference.app import build_app

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_request_of_any_shape_breaks_the_api(engine, tmp_path):
    # Tiny answers keep a few thousand generated requests quick; the cache is off so each one really runs.
    server = InProcessServer(build_app(base_settings(max_tokens_limit=8), engine=engine))
    command = [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "25",
               "--seed", "20261127", "--no-color"]
    try:
        server.wait_ready()
        # Once the model is loaded the document names its id and bounds token ids by its vocabulary, so the
        # generated requests reach generation rather than stopping at a 404 for an unknown model.
        runs = [subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)]
    finally:
        server.stop()
    for result in runs:
        tail = result.stdout[-4000:]
        assert result.returncode == 0, tail
        assert "No issues found" in tail, tail
