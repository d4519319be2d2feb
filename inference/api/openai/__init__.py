"""The OpenAI-compatible API, /v1: schemas.py (bodies and every field's fate), translate.py (parse, then a
GenerationRequest), render.py (whole answers and SSE streams), dialect.py (OpenAI's error shape), routes.py (the
handlers: parse -> translate -> respond -> generate -> render)."""
