"""The service's OTLP span encoder produces exactly the SDK's request, for spans of every shape."""

import logging

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from inference.telemetry.record import rebuild, record
from inference.telemetry.otlp import encode_records


def encode_spans(spans):
    """Our encoding of SDK spans, as the export process makes it: their records, one request per resource (the
    export process has one; requests concatenated are their union), parsed back into a message to compare."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    resources = list(dict.fromkeys(s.resource for s in spans))
    return ExportTraceServiceRequest.FromString(b"".join(
        encode_records([record(s) for s in spans if s.resource is resource], resource) for resource in resources))

VALUES = {
    "text": "POST /api/v1/infer", "empty": "", "unicode": "ünïcødé ✓", "yes": True, "no": False, "zero": 0,
    "port": 8000, "negative": -7, "int64 max": 2**63 - 1, "int64 min": -(2**63), "ratio": 0.25, "nan-free": -1e300,
    "strings": ("a", "b"), "ints": (1, 2, 3), "floats": (0.5, 1.5), "bools": (True, False), "empty tuple": (),
}


def recorded_spans():
    """Spans from two providers (two resources) and three tracers (scopes with and without version, schema and
    attributes): every kind, remote and local parents, trace state, statuses, events, links, dropped counts."""
    exporter = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=40, max_events=2, max_links=1)
    first = TracerProvider(resource=Resource.create({"service.name": "first", "k8s.pod.name": "pod-1"},
                                                    schema_url="https://opentelemetry.io/schemas/1.24.0"),
                           span_limits=limits)
    second = TracerProvider(resource=Resource({"service.name": "second"}))
    for provider in (first, second):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracers = [first.get_tracer("inference", "1.2.3"),
               first.get_tracer("other", schema_url="https://opentelemetry.io/schemas/1.21.0",
                                attributes={"scope.attribute": "x"}),
               second.get_tracer("inference")]
    remote = NonRecordingSpan(SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                                          trace_flags=TraceFlags(1),
                                          trace_state=TraceState([("vendor", "value"), ("other", "1")])))
    for i, kind in enumerate(SpanKind):
        tracer = tracers[i % len(tracers)]
        with tracer.start_as_current_span(f"server {kind.name}", context=trace.set_span_in_context(remote),
                                          kind=kind, attributes=VALUES) as server:
            server.add_event("an event", {"inference.tokens": 3, "list": ("x",)})
            server.add_event("bare")
            server.add_event("one too many")  # dropped by the limits
            with tracer.start_as_current_span("child", links=[Link(remote.get_span_context(), {"why": "retry"}),
                                                                Link(remote.get_span_context())]) as child:
                child.set_attribute("inference.cache.result", "hit")
                child.set_status(Status(StatusCode.ERROR, "the store is down"))
            with tracer.start_as_current_span("ok child") as ok:
                ok.set_status(Status(StatusCode.OK))
            for n in range(45):  # 5 over the limit: dropped_attributes_count
                server.set_attribute(f"extra.{n}", n)
    with tracers[0].start_as_current_span("root without attributes"):
        pass
    return exporter.get_finished_spans()


def test_the_encoder_produces_the_sdks_request_byte_for_byte():
    spans = recorded_spans()
    assert len(spans) > 15
    assert any(s.dropped_attributes for s in spans) and any(s.dropped_events for s in spans)
    assert any(s.dropped_links for s in spans)
    ours, theirs = encode_spans(spans), sdk_encode_spans(spans)
    assert len(ours.resource_spans) == 2
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def test_an_empty_batch_and_single_spans_match_too():
    spans = recorded_spans()
    assert encode_spans([]) == sdk_encode_spans([])
    for span in spans:
        assert encode_spans([span]) == sdk_encode_spans([span]), span.name


def test_spans_sent_to_the_export_process_are_rebuilt_as_they_were():
    """export.record in the service, marshal across the pipe, export.rebuild in the export process: the request
    encoded from the rebuilt spans is the one the SDK would have sent from the originals."""
    import marshal

    spans = recorded_spans()
    rebuilt = [rebuild(entry, span.resource)
               for entry, span in zip(marshal.loads(marshal.dumps([record(s) for s in spans])), spans)]
    assert sdk_encode_spans(rebuilt) == sdk_encode_spans(spans)
    assert encode_spans(rebuilt) == sdk_encode_spans(spans)
    assert [s.dropped_attributes for s in rebuilt] == [s.dropped_attributes for s in spans]


def test_a_value_the_sdk_cannot_encode_is_left_out_with_the_rest_of_the_span_sent(caplog):
    """Ints beyond 64 bits pass the SDK's attribute checks but not protobuf's: both encoders leave them out."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s", attributes={"big": 2**64, "small": 1, "after": "x"}):
        pass
    spans = exporter.get_finished_spans()
    with caplog.at_level(logging.ERROR):
        ours = encode_spans(spans)
    assert "Failed to encode key big" in caplog.text
    assert ours == sdk_encode_spans(spans)
    assert [kv.key for kv in ours.resource_spans[0].scope_spans[0].spans[0].attributes] == ["small", "after"]


def recorder():
    """(exporter, Tracing) whose SDK spans and records (rebuilt as the export process would) all reach `exporter`."""
    from opentelemetry.sdk.trace import sampling

    from inference import SERVICE_NAME, __version__
    from inference.telemetry.tracing import HeadSampler, Tracing

    class Records(SimpleSpanProcessor):
        def add(self, entry):
            self.on_end(rebuild(entry, provider.resource))

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "inference"}), sampler=sampling.ALWAYS_ON)
    processor = Records(exporter)
    provider.add_span_processor(processor)
    return exporter, Tracing(provider.get_tracer(SERVICE_NAME, __version__), provider, processor,
                             HeadSampler(provider.sampler))


def comparable(span):
    """A span's OTLP encoding without what differs between two recordings of it: ids, times, the traceback."""
    message = encode_spans([span]).resource_spans[0]
    one = message.scope_spans[0].spans[0]
    for field in ("span_id", "start_time_unix_nano", "end_time_unix_nano"):
        one.ClearField(field)
    for event in one.events:
        event.ClearField("time_unix_nano")
        for kv in event.attributes:
            if kv.key == "exception.stacktrace":  # where the traceback was taken differs: our frames
                assert "Error: " in kv.value.string_value
                kv.value.string_value = ""
    return message


def test_a_childs_span_is_the_span_the_sdk_would_have_recorded():
    """telemetry.span records children without the SDK's span machinery; what it hands the processor must be what
    `start_as_current_span` would have: same parent, kind, attributes, status and exception event."""
    from inference.telemetry.tracing import span
    from inference.web.state import RequestState, STATE_KEY

    exporter, tracing = recorder()
    tracer = tracing.tracer
    error = ValueError("the store is down")
    with tracer.start_as_current_span("server") as server:
        scope = {STATE_KEY: RequestState(span=server)}
        for make in (lambda: tracer.start_as_current_span("child", attributes={"a": 1}),
                     lambda: span(scope, tracing, "child", a=1)):
            for fails in (False, True):
                try:
                    with make() as child:
                        child.set_attribute("inference.cache.result", "hit")
                        if fails:
                            raise error
                except ValueError:
                    pass
    sdk_ok, sdk_failed, ok, failed = [s for s in exporter.get_finished_spans() if s.name == "child"]
    for theirs, ours in ((sdk_ok, ok), (sdk_failed, failed)):
        assert ours.parent == theirs.parent == server.get_span_context()
        assert ours.context.trace_id == theirs.context.trace_id
        assert ours.context.trace_flags == theirs.context.trace_flags and ours.context.span_id != theirs.context.span_id
        assert ours.start_time <= ours.end_time
        assert comparable(ours) == comparable(theirs)
    assert failed.status.status_code == StatusCode.ERROR and failed.events[0].name == "exception"


def test_a_server_span_is_the_span_the_sdk_would_have_recorded():
    """A sampled request's RecordedSpan: what the SDK's server span would have recorded, the generation span under
    it, the same status rules."""
    from inference.telemetry.tracing import RecordedSpan

    exporter, tracing = recorder()
    parent = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "value")]))
    error = ValueError("the engine failed")
    for make in (lambda: tracing.tracer.start_span("POST", context=trace.set_span_in_context(NonRecordingSpan(parent)),
                                                   kind=SpanKind.SERVER),
                 lambda: tracing.server_span("POST", parent)):
        span = make()
        with trace.use_span(span, end_on_exit=False):
            child = tracing.tracer.start_span("chat model")  # the generation span, under the current span
            child.end()
        span.set_attributes({"http.request.method": "POST", "server.port": 8000})
        span.set_attribute("user.id", "u-1")
        span.add_event("gen_ai.first_token", {"n": 1})
        span.update_name("POST /v1/chat/completions")
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR))
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR, "ignored: OK is final")
        span.end()
        span.end()  # a second end records nothing more
    sdk_child, theirs, our_child, ours = exporter.get_finished_spans()
    assert isinstance(make(), RecordedSpan)
    assert our_child.parent == ours.context and sdk_child.parent == theirs.context
    assert ours.context.trace_id == theirs.context.trace_id == parent.trace_id
    assert ours.context.trace_state == parent.trace_state and ours.parent == parent
    assert comparable(ours) == comparable(theirs)
    assert ours.status.status_code == StatusCode.OK


def test_a_stalled_collector_fills_the_queue_then_spans_are_dropped_counted_and_warned_about_once(
        monkeypatch, capfd):
    """A collector that accepts connections and never answers: the export process's exporter blocks on its first
    batch, its queue (OTEL_BSP_MAX_QUEUE_SIZE) fills, the rest is dropped, counted in the service's metric, with
    one warning for the burst (in the export process's log, which is the service's stderr)."""
    import socket

    from conftest import base_settings

    from inference.telemetry.tracing import Metrics, create_tracing

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    stalled = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever reads or answers
    metrics = Metrics()
    tracing = create_tracing(base_settings(otel_exporter_otlp_endpoint=f"http://127.0.0.1:{stalled.getsockname()[1]}"),
                             metrics)
    try:
        for i in range(200):
            tracing.tracer.start_span(f"span {i}").end()
        assert tracing.processor.force_flush(30_000)  # the export process has taken every span by then
        dropped = metrics.registry.get_sample_value("inference_spans_dropped_total")
        # 16 wait in the queue; at most one batch of 4 had left it for the stalled exporter.
        assert 200 - 16 - 4 <= dropped <= 200 - 16
        warnings = [line for line in capfd.readouterr().err.splitlines() if "queue full" in line]
        assert len(warnings) == 1, warnings
        assert "inference_spans_dropped_total" in warnings[0]
    finally:
        stalled.close()
        tracing.shutdown()


def test_a_dead_export_process_loses_only_what_it_held_and_is_started_again(monkeypatch, caplog):
    """The export process killed: the spans written to it meanwhile are counted as dropped, with one warning and an
    error saying it exited; the next spans start it again and reach the collector."""
    import signal

    from conftest import base_settings

    from inference.telemetry.export import ExportProcess
    from inference.telemetry.tracing import Metrics, create_tracing

    monkeypatch.setattr(ExportProcess, "RESTART_DELAY", 0.0)
    received = []
    sink = otlp_sink(received)
    metrics = Metrics()
    tracing = create_tracing(base_settings(otel_exporter_otlp_endpoint=f"http://127.0.0.1:{sink.server_address[1]}"),
                             metrics)
    try:
        tracing.tracer.start_span("before").end()
        assert tracing.processor.force_flush(10_000)
        first = tracing.processor.process
        first.send_signal(signal.SIGKILL)
        first.wait()
        with caplog.at_level(logging.WARNING, logger="inference.telemetry.export"):
            tracing.tracer.start_span("lost").end()
            tracing.processor.force_flush(10_000)  # finds the process dead: the span is lost, counted; a new one
            assert metrics.registry.get_sample_value("inference_spans_dropped_total") == 1
            tracing.tracer.start_span("after").end()
            assert tracing.processor.force_flush(10_000)
        assert tracing.processor.process is not first
        assert sum("exited" in r.getMessage() for r in caplog.records) == 1
        assert sum("dropping spans" in r.getMessage() for r in caplog.records) == 1
        names = [span.name for request in received for rs in request.resource_spans for ss in rs.scope_spans
                 for span in ss.spans]
        assert names == ["before", "after"]
    finally:
        tracing.shutdown()
        sink.shutdown()
        sink.server_close()


def test_while_a_dead_export_process_waits_to_be_restarted_spans_are_counted_and_flush_says_so(caplog):
    """Killed less than RESTART_DELAY after it started: not restarted yet; spans meanwhile are dropped and counted,
    and a flush answers False at once instead of waiting out its timeout."""
    import signal
    import time

    from conftest import base_settings

    from inference.telemetry.tracing import Metrics, create_tracing

    metrics = Metrics()
    tracing = create_tracing(base_settings(otel_exporter_otlp_endpoint="http://127.0.0.1:9"), metrics)
    try:
        process = tracing.processor.process
        process.send_signal(signal.SIGKILL)
        process.wait()
        for _ in range(3):
            tracing.tracer.start_span("lost").end()
        started = time.perf_counter()
        assert not tracing.processor.force_flush(30_000)
        assert time.perf_counter() - started < 5
        assert metrics.registry.get_sample_value("inference_spans_dropped_total") == 3
        assert tracing.processor.process is process  # restarted only once RESTART_DELAY has passed
    finally:
        tracing.shutdown()


def test_an_export_process_that_stops_reading_never_blocks_the_service(monkeypatch, caplog):
    """The export process stopped (SIGSTOP): the pipe fills, then the backlog (MAX_UNSENT bytes); spans past it
    are dropped and counted, without the service ever waiting. Resumed, it exports everything it was given."""
    import signal
    import time

    from conftest import base_settings

    from inference.telemetry.export import ExportProcess
    from inference.telemetry.tracing import Metrics, create_tracing

    monkeypatch.setattr(ExportProcess, "MAX_UNSENT", 256 * 1024)
    received = []
    sink = otlp_sink(received)
    metrics = Metrics()
    tracing = create_tracing(base_settings(otel_exporter_otlp_endpoint=f"http://127.0.0.1:{sink.server_address[1]}"),
                             metrics)
    process = tracing.processor.process
    try:
        assert tracing.processor.force_flush(10_000)
        process.send_signal(signal.SIGSTOP)
        total, slowest = 20_000, 0.0
        with caplog.at_level(logging.WARNING, logger="inference.telemetry.export"):
            for i in range(total):
                started = time.perf_counter()
                tracing.tracer.start_span("span", attributes={"i": i, "padding": "x" * 100}).end()
                slowest = max(slowest, time.perf_counter() - started)
        dropped = metrics.registry.get_sample_value("inference_spans_dropped_total")
        assert 0 < dropped < total  # the pipe and the backlog took some, the rest was dropped
        assert sum("dropping spans" in r.getMessage() for r in caplog.records) == 1
        assert slowest < 1.0  # never waited for the stopped process (generous: a machine under load)
        process.send_signal(signal.SIGCONT)
        assert tracing.processor.force_flush(30_000)
        exported = sum(len(ss.spans) for request in received for rs in request.resource_spans
                       for ss in rs.scope_spans)
        # what the export process then could not queue (OTEL_BSP_MAX_QUEUE_SIZE) was counted too: none is unaccounted
        assert exported + metrics.registry.get_sample_value("inference_spans_dropped_total") == total
        # At least a full queue: how much more depends on how fast its exporter thread drains the queue while the
        # process reads the backlog (on a slow, busy machine: exactly one queue's worth).
        assert exported >= 2048
    finally:
        process.send_signal(signal.SIGCONT)
        tracing.shutdown()
        sink.shutdown()
        sink.server_close()


def otlp_sink(received):
    """An OTLP/HTTP collector in a thread, keeping every request it is sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_wire_encoder_gives_the_sdks_bytes_from_the_records():
    """What the export process sends: records (as they cross the pipe) encoded straight to bytes, equal to the
    SDK's request for the spans they were made of, serialized; one request per resource, as the export process
    has one."""
    import marshal

    from inference.telemetry.otlp import encode_records

    spans = recorded_spans()
    entries = marshal.loads(marshal.dumps([record(s) for s in spans]))
    resources = list(dict.fromkeys(s.resource for s in spans))
    assert len(resources) == 2
    for resource in resources:
        group = [e for e, s in zip(entries, spans) if s.resource is resource]
        originals = [s for s in spans if s.resource is resource]
        assert encode_records(group, resource) == sdk_encode_spans(originals).SerializeToString()
        for entry, span in zip(group, originals):
            assert encode_records([entry], resource) == sdk_encode_spans([span]).SerializeToString(), span.name
    assert encode_records([], resources[0]) == sdk_encode_spans([]).SerializeToString() == b""
