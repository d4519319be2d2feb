"""The native API, /api/v1: one prompt in, one answer out (JSON, or server-sent events token/done/error), errors in
the framework's own shape (web.dialect.NATIVE)."""
