"""The HTTP protocol's bounds against slow clients (inference/web/protocol.py), on a real uvicorn serving the real
app, over both of uvicorn's protocols (httptools, the default, and h11): a request head must arrive within
HEAD_TIMEOUT_SECONDS and fit the head limit; at MAX_CONNECTIONS a newcomer displaces the oldest connection that
holds no request, or is refused with a JSON 503 when every connection is mid-request."""

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import base_settings, free_port

from inference.app import build_app
from inference.web.protocol import guarded_protocol

MAX_CONNECTIONS = 4
HEAD_TIMEOUT = 0.5


HEAD_LIMIT = 8 * 1024


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(engine, request):
    import uvicorn

    app = build_app(base_settings(rate_limit_enabled=False, body_timeout_seconds=5), engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=guarded_protocol(MAX_CONNECTIONS, HEAD_TIMEOUT, HEAD_LIMIT,
                                                                 request.param),
                                           h11_max_incomplete_event_size=HEAD_LIMIT))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.service.lifecycle.ready):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)  # another thread's state: nothing to await from here
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_response(sock):
    """Everything the server sends until it closes: (status, headers, JSON body)."""
    data = b""
    with sock:
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_head_that_does_not_arrive_in_time_is_408_and_closed(guarded):
    trickling, silent = connect(guarded), connect(guarded)
    trickling.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
    started = time.monotonic()
    for status, headers, body in map(read_response, [trickling, silent]):
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close"
    assert HEAD_TIMEOUT * 0.9 <= time.monotonic() - started < HEAD_TIMEOUT + 5


def test_only_the_head_is_timed_not_the_body_nor_keep_alive(guarded):
    """A body slower than the head timeout (BODY_TIMEOUT_SECONDS bounds it), and an idle spell longer than it
    between two requests on a kept-alive connection, are both fine."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    head = (b"POST /api/v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with connect(guarded) as sock:
        for _ in range(2):
            sock.sendall(head)
            time.sleep(HEAD_TIMEOUT * 2)  # the head is complete: only the body's own timeout applies now
            sock.sendall(body)
            response = b""
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                response += chunk
            assert response.startswith(b"HTTP/1.1 200"), response[:200]
            time.sleep(HEAD_TIMEOUT * 2)  # idle between requests: the keep-alive timeout's business (5 s)


def test_a_head_larger_than_the_limit_is_refused_and_closed(guarded, request):
    """Each protocol holds at most HEAD_LIMIT bytes of a request head (h11 answers a plain 400 of its own)."""
    impl = request.node.callspec.params["guarded"]
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(3 * HEAD_LIMIT // 1024):
                sock.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-head: what we wanted
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if impl == "httptools":
        assert data.startswith(b"HTTP/1.1 431 ") and b'"code": "headers_too_large"' in data, data[:300]
    else:
        assert data.startswith(b"HTTP/1.1 400 "), data[:300]


def test_the_default_is_httptools_where_it_is_installed():
    from inference.web.protocol import implementation

    assert implementation() == "httptools"
    assert guarded_protocol(4, 1.0).__name__ == "GuardedHttpToolsProtocol"
    assert guarded_protocol(4, 1.0, choice="h11").__name__ == "GuardedH11Protocol"


def test_trickling_clients_cannot_lock_a_normal_one_out(guarded):
    """MAX_CONNECTIONS connections sending their heads a byte at a time: a normal client is still served, the
    oldest trickler making room (told 503 too_many_connections)."""
    tricklers = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    for sock in tricklers:
        sock.sendall(b"G")
    time.sleep(0.05)  # let the server take them in before the newcomer (the order decides who is displaced)
    with httpx.Client(base_url=f"http://127.0.0.1:{guarded}", timeout=10) as client:
        assert client.get("/health").status_code == 200
    status, headers, body = read_response(tricklers[0])
    assert status == 503 and body["error"]["code"] == "too_many_connections" and headers["retry-after"] == "1"
    for sock in tricklers:
        sock.close()


def test_when_every_connection_is_mid_request_a_newcomer_gets_a_json_503(guarded):
    busy = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    for sock in busy:  # a whole head, then only part of the body: each holds a request
        sock.sendall(b"POST /api/v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
    time.sleep(0.2)  # accepted and parsed before the newcomer (no event of the server thread to await)
    newcomer = connect(guarded)
    newcomer.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = read_response(newcomer)
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    for sock in busy:
        sock.close()
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=f"http://127.0.0.1:{guarded}", timeout=10) as client:
        while (status := client.get("/health").status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the closed sockets on its own loop
        assert status == 200


def test_the_open_file_limit_is_raised_to_fit_max_connections():
    """A process started at a soft limit of 256 (a hard one far higher) raises it to MAX_CONNECTIONS plus what the
    service itself holds; one whose hard limit is too low keeps it and holds fewer connections."""
    import subprocess
    import sys

    script = """
import resource
from inference.__main__ import FILES_RESERVED, raise_open_file_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))
held = raise_open_file_limit(1024)
print(held, resource.getrlimit(resource.RLIMIT_NOFILE)[0], FILES_RESERVED)
"""
    roomy = subprocess.run([sys.executable, "-c", script.format(hard=4096)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert roomy == ["1280", "1280", "256"]
    tight = subprocess.run([sys.executable, "-c", script.format(hard=512)], capture_output=True, text=True,
                           check=True)
    assert tight.stdout.split()[:2] == ["512", "512"]
    assert "at most 256 connections are held" in tight.stderr
