"""scripts/loadtest.py against a real server: its report must match what the server did."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, InProcessServer, base_settings

SCRIPT = ROOT / "scripts" / "loadtest.py"


def loadtest(url, *args, timeout=120):
    result = subprocess.run([sys.executable, str(SCRIPT), "--url", url, "--json", "--max-tokens", "8", *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_closed_loop_report_counts_every_request(live):
    report = loadtest(live.url, "--duration", "3", "--concurrency", "2")
    assert report["mode"] == "concurrency" and report["endpoint"] == "/api/v1/infer"
    assert report["requests"] >= 2 and report["unfinished"] == 0
    assert report["successes"] == report["requests"], report
    assert report["rate_limited_429"] == report["overloaded_503"] == report["other_errors"] == 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["ttft_ms"] == {"p50": None, "p95": None}  # not streamed: no first token to time
    assert 0 < report["completion_tokens"] <= 8 * report["requests"]
    assert report["tokens_per_second"] > 0
    assert report["cache"] == {"BYPASS": report["requests"]}  # Cache-Control: no-store unless --cache


def test_streamed_chat_measures_time_to_first_token(live):
    # Ends on the request count, however slow the machine is today.
    report = loadtest(live.url, "--endpoint", "chat", "--stream", "--duration", "600", "--concurrency", "1",
                      "--max-requests", "3")
    assert report["endpoint"] == "/v1/chat/completions" and report["stream"]
    assert report["requests"] == report["successes"] == 3
    ttft, latency = report["ttft_ms"], report["latency_ms"]
    assert 0 < ttft["p50"] <= ttft["p95"] <= latency["p99"]
    assert 3 <= report["completion_tokens"] <= 24  # usage from the stream's last chunk


def test_open_loop_with_stages_and_refusals_counted(engine):
    settings = base_settings(rate_limit_enabled=True, rate_limit_per_minute=2)
    from inference.app import build_app

    server = InProcessServer(build_app(settings, engine=engine))
    try:
        server.wait_ready()
        report = loadtest(server.url, "--rate", "--stages", "1s:10,1s:10", "--max-workers", "8")
    finally:
        server.stop()
    assert report["mode"] == "rate" and [s["seconds"] for s in report["stages"]] == [1.0, 1.0]
    # Ramping from 0 to 10 requests/s and holding: about 15 arrivals; the budget lets exactly 2 through.
    assert 8 <= report["requests"] <= 20, report
    assert report["successes"] == 2
    assert report["rate_limited_429"] == report["requests"] - 2
    assert report["other_errors"] == 0


def test_ctrl_c_prints_the_report_so_far(live):
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--url", live.url, "--json", "--duration", "600",
                                "--concurrency", "1", "--max-tokens", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.stderr.read(1)  # the first progress line: the run is under way
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    report = json.loads(out)
    assert report["interrupted"] and report["duration_seconds"] < 60


@pytest.mark.parametrize("args, message", [
    (["--stages", "10x:4"], "is not DURATION:LOAD"),
    (["--concurrency", "0"], "must be > 0"),
    (["--rate"], "--rate needs a value"),
    (["--stages", "1s:1", "--concurrency", "2"], "drop --concurrency"),
])
def test_bad_arguments_are_refused_with_a_reason(args, message):
    result = subprocess.run([sys.executable, str(SCRIPT), "--url", "http://127.0.0.1:9", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("endpoint, events", [
    ("chat", [b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}']),
    ("infer", [b'event: token\ndata: {"text": "Hel"}']),
])
def test_a_stream_cut_short_is_an_error_not_a_success(endpoint, events):
    """A peer that answers 200 and closes the connection before the stream's end (`[DONE]`, or the native API's
    `done` event), as a proxy's idle timeout or a crash between events would: the load test must count it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class CutShort(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for event in events:
                self.wfile.write(event + b"\n\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = loadtest(f"http://127.0.0.1:{server.server_address[1]}", "--endpoint", endpoint, "--stream",
                          "--model", "m", "--duration", "600", "--concurrency", "1", "--max-requests", "2")
    finally:
        server.shutdown()
        server.server_close()
    assert report["successes"] == 0 and report["other_errors"] == 2, report
    assert report["errors_by_kind"] == {"stream_cut": 2}
