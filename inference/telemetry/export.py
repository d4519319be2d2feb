"""Span export in a process of its own, so that exporting costs the request path nothing but a hand-off.

The OpenTelemetry SDK's batch processor exports from a thread: encoding and sending each span (~18 us of CPU a
span here) hold the GIL the event loop needs, and every hand-over of the GIL between that thread and the event
loop costs more on top. With every request traced, the export thread took 54 us of CPU per cache hit and the
event loop ~20-40 us more than without it: the service answered half as many requests.

Here the service's process only turns each finished span into a tuple of plain values and, 64 at a time (or
every 100 ms), writes them with `marshal` to a pipe, without ever blocking. The export process (`python -m
inference.telemetry.export`, started with the service, ignoring SIGINT and SIGTERM, ending when the pipe closes) rebuilds
the spans and hands them to the SDK's BatchSpanProcessor and OTLP exporter as before: OTEL_BSP_*,
OTEL_EXPORTER_OTLP_* (headers, timeouts, certificates, compression) and OTEL_RESOURCE_ATTRIBUTES apply there
unchanged. Spans dropped on either side (the pipe's buffer full, the export queue full, the process gone) are
counted in `inference_spans_dropped_total`, with one warning per burst. If the export process dies it is started
again, at most once per RESTART_DELAY seconds.
"""

from __future__ import annotations

import collections
import json
import logging
import marshal
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from .record import Drops, Record, record

log = logging.getLogger(__name__)

class ExportProcess(SpanProcessor):
    """The service's side: records in, frames (4-byte length, little-endian, then `marshal` of a list of
    records; length 0: a flush request, answered "flushed") out to the export process's stdin, without blocking.
    Its stdout reports "dropped N" and "flushed" lines."""

    FLUSH_AT = 64  # records per frame
    INTERVAL = 0.1  # seconds: what is pending is written at least this often
    MAX_UNSENT = 16 * 1024 * 1024  # bytes waiting for the pipe; past this, new spans are dropped
    RESTART_DELAY = 10.0  # seconds between starts of the export process

    def __init__(self, config: dict[str, Any], on_drop: Callable[[int], None]) -> None:
        self.config = config
        self.drop = Drops(on_drop, "span export falling behind: dropping spans (counted in "
                                   "inference_spans_dropped_total); one warning per burst", log)
        self.lock = threading.Lock()
        self.pending: list[Record] = []
        self.frames: collections.deque[tuple[memoryview, int]] = collections.deque()  # (unsent bytes, spans)
        self.unsent = 0
        self.flushes = 0  # "flushed" answers received
        self.answered = threading.Condition()
        self.process: subprocess.Popen[bytes] | None = None
        self.started = -math.inf
        self.closed = threading.Event()
        with self.lock:
            self._start()
        threading.Thread(target=self._tick, name="span-export-writer", daemon=True).start()

    # -- the SpanProcessor interface (the SDK's spans: the request's server span, the generation span)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.add(record(span))

    def add(self, entry: Record) -> None:
        with self.lock:
            self.pending.append(entry)
            if len(self.pending) >= self.FLUSH_AT:
                self._write()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Everything pending written, then exported by the export process (or `timeout_millis` passed)."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self.lock:
            self._write()
            self._frame(b"", 0)
            expected = self.flushes + 1
            process = self.process
        while time.monotonic() < deadline:
            with self.lock:
                self._write()
                if process is not self.process or not self._alive():
                    return False  # the export process died: what it held is lost (counted)
            with self.answered:
                if self.answered.wait_for(lambda: self.flushes >= expected, timeout=0.05):
                    return True
        return False

    def shutdown(self) -> None:
        """Write what is pending, close the pipe: the export process exports what it holds, then exits."""
        timeout = float(os.environ.get("OTEL_BSP_EXPORT_TIMEOUT", 30000)) / 1000 + 5
        deadline = time.monotonic() + timeout
        self.closed.set()
        with self.lock:
            self._write()
            while self.frames and time.monotonic() < deadline and self._alive():
                self.lock.release()
                time.sleep(0.005)
                self.lock.acquire()
                self._write()
            process, self.process = self.process, None
        if process is None:
            return
        self._close(process)
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("span export process still busy after %.0f s: stopped", timeout)
            process.kill()
            process.wait()

    # -- the pipe (everything below runs with self.lock held)

    def _frame(self, data: bytes, spans: int) -> None:
        self.frames.append((memoryview(len(data).to_bytes(4, "little") + data), spans))
        self.unsent += len(data) + 4

    def _write(self) -> None:
        if self.pending:
            entries, self.pending = self.pending, []
            try:
                data = marshal.dumps(entries)
            except ValueError:  # a value marshal cannot write: never from the service's own spans
                log.exception("span records that cannot be written: dropped")
                self.drop(len(entries))
                data = b""
            if data and self.unsent + len(data) > self.MAX_UNSENT:
                self.drop(len(entries))
            elif data:
                self._frame(data, len(entries))
        if not self.frames:
            return
        if not self._alive():
            lost = sum(spans for _, spans in self.frames)
            self.frames.clear()
            self.unsent = 0
            if lost:
                self.drop(lost)
            if time.monotonic() - self.started >= self.RESTART_DELAY and not self.closed.is_set():
                self._start()
            return
        fd = self.process.stdin.fileno()  # type: ignore[union-attr]
        while self.frames:
            view, spans = self.frames[0]
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                return
            except OSError:  # the export process is gone: the next write counts what was lost
                return
            self.unsent -= written
            if written < len(view):
                self.frames[0] = (view[written:], spans)
                return
            self.frames.popleft()

    def _alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _start(self) -> None:
        if self.process is not None:
            log.error("the span export process exited (status %s): starting it again", self.process.returncode)
            self._close(self.process)
        self.started = time.monotonic()
        self.process = process = subprocess.Popen(
            [sys.executable, "-m", "inference.telemetry.export", json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        fd = process.stdin.fileno()  # type: ignore[union-attr]
        os.set_blocking(fd, False)
        try:
            import fcntl
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1024 * 1024)  # Linux: a 1 MiB pipe
        except (OSError, ImportError):
            pass
        threading.Thread(target=self._read, args=(process,), name="span-export-reader", daemon=True).start()

    @staticmethod
    def _close(process: subprocess.Popen[bytes]) -> None:
        try:
            process.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        with process.stdout:  # type: ignore[union-attr]
            self._answers(process.stdout)  # type: ignore[arg-type]

    def _answers(self, lines: Any) -> None:
        for line in lines:
            if line.startswith(b"dropped "):
                self.drop.count(int(line.split()[1]))  # the export process warned about it
            elif line.startswith(b"flushed"):
                with self.answered:
                    self.flushes += 1
                    self.answered.notify_all()

    def _tick(self) -> None:
        while not self.closed.wait(self.INTERVAL):
            with self.lock:
                if self.pending or self.frames or not self._alive():
                    self._write()


def main() -> None:
    """The export process: frames from stdin, spans to the SDK's batch processor and OTLP exporter."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the service, which closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    from .logs import configure_stream

    configure_stream(config["log_level"], config["log_format"])

    from opentelemetry.sdk.resources import Resource

    from .otlp import BoundedSpanProcessor, Entry, grpc_exporter, http_exporter

    endpoint = config["endpoint"]
    resource = Resource.create(config["resource"])
    if config["protocol"] == "grpc":
        exporter = grpc_exporter(endpoint, insecure=endpoint.startswith("http://"), resource=resource)
    else:
        exporter = http_exporter(f"{endpoint}/v1/traces", resource)
    dropped = 0

    def count(n: int) -> None:
        nonlocal dropped
        dropped += n

    processor = BoundedSpanProcessor(exporter, on_drop=count)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            break
        size = int.from_bytes(header, "little")
        if size:
            data = stdin.read(size)
            if len(data) < size:
                break  # the service ended in the middle of a frame
            for entry in marshal.loads(data):  # records go to the exporter as they came (otlp.encode_records)
                processor.on_end(Entry(entry))
        else:
            processor.force_flush()
        if dropped:
            stdout.write(b"dropped %d\n" % dropped)
            dropped = 0
        if not size:
            stdout.write(b"flushed\n")
        stdout.flush()
    processor.shutdown()


if __name__ == "__main__":
    main()
