"""What happens between a handler and an engine: starting generations (deadlines, token budget, their metrics and
spans, engine errors as HTTP errors), the service's lifecycle and readiness, the response cache, idempotency,
structured output and tool planning. Imports engine, store, telemetry, web and config; never api or middleware."""
