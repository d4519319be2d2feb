"""Metrics, tracing (the sampler, recorded spans), the span record both processes share, the span export process and
its OTLP encoding, and log lines. Imports config and web (the request state holds the server span)."""
