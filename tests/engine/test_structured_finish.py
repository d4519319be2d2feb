"""Structured answers that finish: under a grammar the embedded engine closes the document when its token budget is
about to run out (STRUCTURED_CLOSING_TOKENS), so a finished, valid answer fits in max_tokens where it can; the
grammar still decides every token, so closing never admits an answer the schema does not."""

import asyncio
import json

import jsonschema
import pytest
from conftest import own_engine

from inference.engine.base import ChatMessage, GenerationRequest, SamplingParams
from inference.engine.llama.sequence import JsonDepth
from inference.serving.structured import parse_response_format

FRUITS = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
          "required": ["fruits"], "additionalProperties": False}
NESTED = {"type": "object", "required": ["title", "sections"], "additionalProperties": False, "properties": {
    "title": {"type": "string"},
    "sections": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["heading", "body"], "additionalProperties": False,
        "properties": {"heading": {"type": "string"}, "body": {"type": "string"}}}}}}


def test_json_depth_knows_what_is_open_and_skips_what_strings_hold():
    depth = JsonDepth()
    assert (depth.to_close, depth.closer) == (1, "")  # nothing open: only the end
    for piece in (b'{"a": [1, {"b": "x', b'}]\\" ', b'still in the string'):
        depth.feed(piece)
    assert (bytes(depth.open), depth.in_string, depth.to_close, depth.closer) == (b"{[{", True, 5, '"')
    depth.feed(b'"}')
    assert (depth.to_close, depth.closer) == (3, "]")
    depth.feed(b']}')
    assert (depth.to_close, depth.closer) == (1, "")


def answer(engine, prompt, schema, max_tokens):
    structured = parse_response_format({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})

    async def run():
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **structured.sampling())
        generation = await engine.generate(GenerationRequest(params, messages=(ChatMessage("user", prompt),)))
        return "".join([piece async for piece in generation]), generation

    return asyncio.run(run())


@pytest.mark.parametrize("schema, prompt", [(FRUITS, "List one hundred fruits."),
                                            (NESTED, "Write a long report about the history of Rome.")])
def test_an_answer_that_would_run_past_max_tokens_closes_within_it_and_is_valid(model_file, schema, prompt):
    with own_engine(model_file, structured_closing_tokens=16) as engine:
        for max_tokens in (32, 64):
            text, generation = answer(engine, prompt, schema, max_tokens)
            assert generation.finish_reason == "stop", text
            assert generation.completion_tokens <= max_tokens
            jsonschema.validate(json.loads(text), schema)

