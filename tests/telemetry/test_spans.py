"""The service's own sampling decision gives what the OpenTelemetry SDK's samplers would have (its SERVER span is
compared with the SDK's in test_otlp.py)."""

import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from inference import SERVICE_NAME, __version__
from inference.telemetry.tracing import HeadSampler, RecordedSpan, Tracing

BUILT_IN = {
    "always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
    "traceidratio 0.25": sampling.TraceIdRatioBased(0.25), "traceidratio 0": sampling.TraceIdRatioBased(0),
    "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio 0.1": sampling.ParentBased(sampling.TraceIdRatioBased(0.1)),
}


def remote(trace_id, sampled):
    return SpanContext(trace_id, random.getrandbits(64) | 1, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))


@pytest.mark.parametrize("name", BUILT_IN)
def test_the_inline_decision_is_the_sdk_samplers(name):
    sdk = BUILT_IN[name]
    ours = HeadSampler(sdk)
    assert ours.decides
    rng = random.Random(7)
    decisions = set()
    for _ in range(3000):
        trace_id = rng.getrandbits(128) or 1
        for parent in (None, remote(trace_id, True), remote(trace_id, False)):
            context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
            expected = sdk.should_sample(context, trace_id, "POST", SpanKind.SERVER).decision.is_sampled()
            assert ours.sampled(trace_id, parent) == expected, (trace_id, parent)
            decisions.add(expected)
    if "0.25" in name or "0.1" in name or "parentbased" in name:
        assert decisions == {True, False}  # both outcomes were compared


def test_any_other_sampler_is_left_to_the_sdk():
    custom = sampling.ParentBased(sampling.ALWAYS_OFF, remote_parent_not_sampled=sampling.ALWAYS_ON)
    assert not HeadSampler(custom).decides
    provider = TracerProvider(sampler=custom)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    tracing = Tracing(provider.get_tracer(SERVICE_NAME, __version__), provider, None, HeadSampler(custom))
    parent = remote(0x1234, False)
    span = tracing.server_span("POST", parent)
    assert not isinstance(span, RecordedSpan) and span.is_recording()  # the SDK applied the custom delegate
    assert span.get_span_context().trace_id == 0x1234 and span.parent == parent
    assert not tracing.server_span("POST", None).is_recording()


def test_unsampled_requests_carry_the_trace_onward_and_record_nothing():
    provider = TracerProvider(sampler=sampling.ParentBased(sampling.TraceIdRatioBased(0.0)))
    tracing = Tracing(provider.get_tracer(SERVICE_NAME, __version__), provider, None, HeadSampler(provider.sampler))
    parent = remote(0xABC, False)
    span = tracing.server_span("POST", parent)
    context = span.get_span_context()
    assert not span.is_recording() and not context.trace_flags.sampled
    assert context.trace_id == 0xABC and context.span_id != parent.span_id and context.is_valid
    root = tracing.server_span("POST", None).get_span_context()
    assert root.is_valid and not root.trace_flags.sampled
    assert isinstance(tracing.server_span("POST", remote(0xABC, True)), RecordedSpan)  # the caller's choice
