"""Traces received by a real OTLP/HTTP endpoint in the test, decoded with opentelemetry-proto."""

import asyncio
import json

from conftest import Running, base_settings, call_asgi

from inference.app import build_app

JSON = [("content-type", "application/json")]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def attributes(span):
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = list(x.string_value for x in v.array_value.values) if kind == "array_value" else getattr(v, kind)
    return out


def test_a_request_joins_the_callers_trace_with_child_spans_and_genai_attributes(engine, otlp, key_prefix):
    settings = base_settings(otel_exporter_otlp_endpoint=otlp.url, rate_limit_enabled=True, cache_mode="all",
                             redis_key_prefix=key_prefix, otel_service_name="inference-under-test")
    app = build_app(settings, engine=engine)
    body = json.dumps({"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 16}).encode()
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

    async def scenario():
        async with Running(app):
            response = await call_asgi(app, "POST", "/api/v1/infer", body, [*JSON, ("traceparent", traceparent)])
            untraced = await call_asgi(app, "GET", "/health")
            # Leaving Running shuts the tracer provider down, which flushes the batch.
        return response, untraced

    response, untraced = asyncio.run(scenario())
    assert response.status == 200
    spans = otlp.wait_for(lambda spans: any(s.name == "POST /api/v1/infer" for s in spans))
    assert otlp.service_names() == {"inference-under-test"}
    mine = [s for s in spans if s.trace_id.hex() == CALLER_TRACE]
    by_name = {s.name: s for s in mine}
    server = by_name["POST /api/v1/infer"]
    assert server.parent_span_id.hex() == CALLER_SPAN
    assert server.kind == server.SPAN_KIND_SERVER
    server_attributes = attributes(server)
    assert server_attributes["http.route"] == "/api/v1/infer"
    assert server_attributes["http.request.method"] == "POST"
    assert server_attributes["http.response.status_code"] == 200
    for child in ("rate_limit", "cache lookup", f"chat {engine.info.name}", "cache store"):
        assert by_name[child].parent_span_id == server.span_id, child
    generation = by_name[f"chat {engine.info.name}"]
    gen_ai = attributes(generation)
    answer = response.json()
    assert gen_ai["gen_ai.request.model"] == engine.info.name
    assert gen_ai["gen_ai.request.max_tokens"] == 16
    assert gen_ai["gen_ai.request.temperature"] == 0.0
    assert gen_ai["gen_ai.usage.input_tokens"] == answer["prompt_tokens"]
    assert gen_ai["gen_ai.usage.output_tokens"] == answer["completion_tokens"]
    assert gen_ai["gen_ai.response.finish_reasons"] == [answer["finish_reason"]]
    assert [e.name for e in generation.events] == ["gen_ai.first_token"]
    assert attributes(by_name["cache lookup"])["inference.cache.result"] == "miss"
    # A request without traceparent starts a trace of its own.
    health = [s for s in spans if s.name == "GET /health"]
    assert len(health) == 1 and health[0].trace_id.hex() != CALLER_TRACE and not health[0].parent_span_id


def test_errors_set_span_status_and_exemplars_link_metrics_to_traces(engine, otlp):
    settings = base_settings(otel_exporter_otlp_endpoint=otlp.url)
    app = build_app(settings, engine=engine)
    body = json.dumps({"prompt": "word " * 2100, "max_tokens": 8}).encode()

    async def scenario():
        async with Running(app):
            bad = await call_asgi(app, "POST", "/api/v1/infer", body, JSON)
            ok = await call_asgi(app, "POST", "/api/v1/infer", b'{"prompt": "Hi", "max_tokens": 2}', JSON)
            scraped = await call_asgi(app, "GET", "/metrics", headers=[("accept", "application/openmetrics-text")])
            app.service.lifecycle.drain()  # /ready answers 503 from now on: a 5xx, an error span
            await asyncio.sleep(0)
            draining = await call_asgi(app, "GET", "/ready")
        return bad, ok, scraped, draining

    bad, ok, scraped, draining = asyncio.run(scenario())
    assert bad.status == 400 and ok.status == 200 and draining.status == 503
    spans = otlp.wait_for(lambda spans: sum(s.name == "POST /api/v1/infer" for s in spans) == 2
                          and any(s.name == "GET /ready" for s in spans))
    statuses = {s.name: s.status.code for s in spans if s.name.startswith(("POST", "GET"))}
    assert statuses["GET /ready"] == spans[0].status.STATUS_CODE_ERROR
    assert statuses["POST /api/v1/infer"] == spans[0].status.STATUS_CODE_UNSET  # a 400 is the caller's error
    generations = [s for s in spans if s.name.startswith("chat ")]
    failed = [s for s in generations if s.status.code == s.status.STATUS_CODE_ERROR]
    assert len(failed) == 1 and "context" in failed[0].status.message
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    text = scraped.body.decode()
    exemplar_lines = [line for line in text.splitlines() if "# {trace_id=" in line]
    assert any(line.startswith("inference_http_request_duration_seconds_bucket") for line in exemplar_lines)
    traced = {s.trace_id.hex() for s in spans}
    assert any(line.split('trace_id="')[1][:32] in traced for line in exemplar_lines)


def test_no_endpoint_no_spans_and_no_tracer_cost(engine):
    from opentelemetry import trace

    app = build_app(base_settings(otel_exporter_otlp_endpoint=None), engine=engine)
    assert isinstance(app.service.tracer, trace.NoOpTracer)
    assert app.service.tracing.provider is None


def test_grpc_protocol_exports_to_a_grpc_collector(engine):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (the generated service's naming)
            received.extend(s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = base_settings(otel_exporter_otlp_endpoint=f"http://127.0.0.1:{port}",
                                 otel_exporter_otlp_protocol="grpc")
        app = build_app(settings, engine=engine)

        async def scenario():
            async with Running(app):  # leaving it flushes the batch to the collector
                return await call_asgi(app, "GET", "/health")

        assert asyncio.run(scenario()).status == 200
    finally:
        server.stop(grace=None)
    assert "GET /health" in received


def test_an_unsampled_request_records_nothing_and_a_sampled_one_does(engine, otlp):
    settings = base_settings(otel_exporter_otlp_endpoint=otlp.url, rate_limit_enabled=True, cache_mode="all")
    app = build_app(settings, engine=engine)
    body = json.dumps({"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 4}).encode()
    unsampled_trace, sampled_trace = "1" * 32, "2" * 32

    async def scenario():
        async with Running(app):
            # The caller decided not to sample (flags 00): the parent-based sampler follows it.
            quiet = await call_asgi(app, "POST", "/api/v1/infer", body,
                                    [*JSON, ("traceparent", f"00-{unsampled_trace}-{CALLER_SPAN}-00")])
            loud = await call_asgi(app, "POST", "/api/v1/infer", body,
                                   [*JSON, ("traceparent", f"00-{sampled_trace}-{CALLER_SPAN}-01")])
            # A traceparent that is not one (garbage, an all-zero trace id) is ignored: a trace of its own.
            odd = [await call_asgi(app, "GET", "/health", headers=[("traceparent", value)])
                   for value in ("garbage", f"00-{'0' * 32}-{CALLER_SPAN}-01")]
        return quiet, loud, odd

    quiet, loud, odd = asyncio.run(scenario())
    assert quiet.status == loud.status == 200 and [r.status for r in odd] == [200, 200]
    spans = otlp.wait_for(lambda spans: any(s.trace_id.hex() == sampled_trace for s in spans)
                          and sum(s.name == "GET /health" for s in spans) == 2)
    roots = [s for s in spans if s.name == "GET /health"]
    assert all(not s.parent_span_id and s.trace_id.hex() not in ("0" * 32, sampled_trace) for s in roots)
    assert not [s for s in spans if s.trace_id.hex() == unsampled_trace]  # no server span, no child spans
    assert {s.name for s in spans if s.trace_id.hex() == sampled_trace} >= {"POST /api/v1/infer", "rate_limit",
                                                                            "cache lookup"}


def test_the_upstream_backend_carries_the_trace_to_the_upstream_sampled_or_not(engine, otlp):
    from conftest import InProcessServer

    from inference.engine.upstream import UpstreamEngine

    traced = base_settings(otel_exporter_otlp_endpoint=otlp.url, otel_service_name="upstream")
    upstream = InProcessServer(build_app(traced, engine=engine))
    upstream.wait_ready()
    gateway_settings = base_settings(otel_exporter_otlp_endpoint=otlp.url, otel_service_name="gateway",
                                     model_backend="openai", upstream_url=f"{upstream.url}/v1")
    forwarder = UpstreamEngine(f"{upstream.url}/v1")
    gateway = build_app(gateway_settings, engine=forwarder)
    body = json.dumps({"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 4}).encode()
    sampled, unsampled = "3" * 32, "4" * 32

    async def scenario():
        async with Running(gateway):
            for trace_id, flags in ((unsampled, "00"), (sampled, "01")):
                response = await call_asgi(gateway, "POST", "/api/v1/infer", body,
                                           [*JSON, ("traceparent", f"00-{trace_id}-{CALLER_SPAN}-{flags}")])
                assert response.status == 200
        await forwarder.close()  # an engine passed in is its owner's to close

    try:
        asyncio.run(scenario())
    finally:
        upstream.stop()
    spans = otlp.wait_for(lambda spans: any(s.trace_id.hex() == sampled and s.name == "POST /v1/chat/completions"
                                            for s in spans))
    assert not [s for s in spans if s.trace_id.hex() == unsampled]  # neither side recorded the unsampled one
    mine = [s for s in spans if s.trace_id.hex() == sampled]
    by_id = {s.span_id: s for s in mine}
    # One trace across both: the upstream's server span is a child of the gateway's server span.
    upstream_server = next(s for s in mine if s.name == "POST /v1/chat/completions")
    assert by_id[upstream_server.parent_span_id].name == "POST /api/v1/infer"
    assert any(s.name.startswith("chat ") and s.parent_span_id == upstream_server.span_id for s in mine)
