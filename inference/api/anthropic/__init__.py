"""Anthropic's Messages API, /v1/messages: schemas.py (bodies, content blocks and every field's fate), translate.py
(an Anthropic request into the OpenAI chat request it means, then openai/translate.py's GenerationRequest: one
pipeline), render.py (a Message, or its SSE event sequence), dialect.py (Anthropic's error shape and statuses),
routes.py (the handlers)."""
