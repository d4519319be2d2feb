"""POST /tokenize and /detokenize: the model's own tokenizer, in the shapes llama.cpp's server and vLLM use, so
clients can budget a context before they send a request. Behind API keys; not rate-limited (no generation)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..engine.base import EngineError, Tokenizer
from ..serving.generation import http_error_of
from ..serving.service import Service
from ..web.errors import HTTPError
from ..web.http import Request, Response, json_response
from ..web.router import Route
from ..web.validation import from_json, spec
from .openai.schemas import ChatCompletionMessage
from .openai.translate import chat_messages, message_fates


@dataclass(frozen=True)
class TokenizeRequest:
    """Text to count in the model's own tokens: `content` (llama.cpp's server), else `prompt`, else `messages`
    (vLLM's; rendered with the chat template as /v1/chat/completions would); none of them: no tokens."""

    content: str | None = None
    prompt: str | None = None
    messages: list[ChatCompletionMessage] | None = field(default=None, metadata=spec(min_items=1))
    model: str | None = field(default=None, metadata=spec(description="Accepted for vLLM's clients; not checked."))
    add_special: bool | None = field(default=None, metadata=spec(
        description="Add the beginning-of-sequence token (default: false for content, true for prompt)."))
    add_special_tokens: bool | None = field(default=None, metadata=spec(description="vLLM's name for add_special."))
    add_generation_prompt: bool = field(default=True, metadata=spec(
        description="messages: end with the assistant's cue, as a chat completion's prompt does."))
    with_pieces: bool = field(default=False, metadata=spec(description="Answer each token with its text piece."))


@dataclass(frozen=True)
class TokenPiece:
    id: int
    piece: str


@dataclass(frozen=True)
class TokenizeResponse:
    # ids, or with `with_pieces` {"id", "piece"} objects (TokenPiece), as llama.cpp's server answers
    tokens: list[Any] = field(metadata=spec(description="token ids; with with_pieces, {id, piece} objects"))
    count: int
    max_model_len: int


@dataclass(frozen=True)
class DetokenizeRequest:
    tokens: list[int] = field(metadata=spec(max_items=1_000_000))
    model: str | None = None


@dataclass(frozen=True)
class DetokenizeResponse:
    content: str
    prompt: str


def routes(service: Service) -> list[Route]:
    settings: Settings = service.settings

    def engine_with_tokenizer():
        service.model()  # 503 while loading
        engine = service.engine
        if not isinstance(engine, Tokenizer):
            raise HTTPError(501, "not_supported", "the upstream backend has no tokenizer here; ask the upstream's "
                                                  "own /tokenize")
        return engine

    async def tokenize(request: Request) -> Response:
        # Closed: a field this endpoint does not know is a 422 naming it. Its messages are /v1's, with their fates
        # (a message field that cannot be honoured is a 400 naming it).
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        forwarded = message_fates(raw, embedded=True)
        body = from_json(TokenizeRequest, raw)
        engine = engine_with_tokenizer()
        special = body.add_special if body.add_special is not None else body.add_special_tokens
        try:
            if body.content is None and body.prompt is None and body.messages is not None:
                # Counted as /v1/chat/completions sends them (tool turns written by the template where it can).
                native = service.native_tools()
                messages, _ = chat_messages(body.messages, forwarded, settings,
                                            native.syntax if native is not None else None)
                tokens = await asyncio.to_thread(engine.render, messages,
                                                 add_generation_prompt=body.add_generation_prompt)
            else:
                text = body.content if body.content is not None else body.prompt or ""
                add_bos = special if special is not None else body.prompt is not None
                tokens = await asyncio.to_thread(engine.tokenize, text, special=True, add_bos=add_bos)
        except EngineError as exc:
            raise http_error_of(exc) from None
        listed: list = tokens
        if body.with_pieces:  # a piece per token: off the event loop, a long text has many
            listed = await asyncio.to_thread(lambda: [{"id": t, "piece": engine.detokenize([t])} for t in tokens])
        return json_response({"tokens": listed, "count": len(tokens), "max_model_len": engine.info.context_length})

    async def detokenize(request: Request) -> Response:
        body = from_json(DetokenizeRequest, await request.json(settings.max_body_bytes, settings.body_timeout_seconds))
        engine = engine_with_tokenizer()
        try:
            text = await asyncio.to_thread(engine.detokenize, body.tokens)
        except ValueError as exc:
            raise HTTPError(422, "validation_error", f"tokens: {exc}", field="tokens") from None
        return json_response({"content": text, "prompt": text})

    return [
        Route("POST", "/tokenize", tokenize, summary="The model's tokens for a text or a chat (llama.cpp / vLLM shape)",
              request_schema=TokenizeRequest, response_schema=TokenizeResponse, errors=(400, 401, 413, 422, 501, 503),
              links={"Detokenize": ("POST /detokenize", {"requestBody": {"tokens": "$response.body#/tokens"}})}),
        Route("POST", "/detokenize", detokenize, summary="The text of a list of token ids",
              request_schema=DetokenizeRequest, response_schema=DetokenizeResponse, errors=(400, 401, 413, 422, 501, 503)),
    ]
