"""The hand-written web framework: requests and responses, the router, validation into dataclasses and the OpenAPI
document built from the same rules, HTTPError and the dialects that render it, the per-request state.
Knows nothing of models or engines; imports only config."""
