#!/usr/bin/env python3
"""A fixed-answer OpenAI-compatible server, for measuring what the gateway (MODEL_BACKEND=openai) costs.

    python scripts/fixed_upstream.py --port 9100 [--tokens 20] [--token-delay-ms 0]

Answers GET /v1/models, POST /v1/chat/completions and /v1/completions (streaming or not) with the same
text every time, as fast as uvicorn can, so that anything measured in front of it is the gateway's cost.
This is a benchmark fixture only: the service itself never serves fixed answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn

MODEL = "fixed-answer"


def build(tokens: int, delay: float):
    words = [f" word{i}" for i in range(tokens)]
    usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                      "owned_by": "bench"}]}).encode()
    chat = json.dumps({"id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                    "finish_reason": "length"}], "usage": usage}).encode()
    text = json.dumps({"id": "cmpl-fixed", "object": "text_completion", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "text": "".join(words), "finish_reason": "length"}],
                       "usage": usage}).encode()

    def chunk(delta: dict, finish=None, chat_kind=True) -> bytes:
        if chat_kind:
            body = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        else:
            body = {"id": "cmpl-fixed", "object": "text_completion", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "text": delta.get("content", ""), "finish_reason": finish}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def app(scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path.endswith("/models"):
            await respond(send, models)
            return
        request = json.loads(body or b"{}")
        is_chat = path.endswith("/chat/completions")
        if not request.get("stream"):
            await respond(send, chat if is_chat else text)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if is_chat:
            await send({"type": "http.response.body", "body": chunk({"role": "assistant", "content": ""}),
                        "more_body": True})
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, word in enumerate(words):
            if delay:
                # An absolute schedule: a late wake-up does not push back every later token.
                await asyncio.sleep(max(0.0, start + (i + 1) * delay - loop.time()))
            await send({"type": "http.response.body", "body": chunk({"content": word}, chat_kind=is_chat),
                        "more_body": True})
        tail = chunk({}, "length", chat_kind=is_chat)
        tail += b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [],
                                        "usage": usage}).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    return app


async def respond(send, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(build(args.tokens, args.token_delay_ms / 1000), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
