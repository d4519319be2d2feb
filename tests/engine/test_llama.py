"""The embedded engine against the real default model."""

import asyncio

import pytest

from inference.config import DEFAULT_SYSTEM_PROMPT
from inference.engine.base import (
    ChatMessage,
    ContextLengthExceeded,
    EngineOverloaded,
    GenerationRequest,
    SamplingParams,
)

from conftest import own_engine, says_four, says_paris


def chat(prompt, **params):
    params.setdefault("max_tokens", 24)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        params=SamplingParams(**params),
        messages=(ChatMessage("system", DEFAULT_SYSTEM_PROMPT), ChatMessage("user", prompt)),
    )


async def collect(engine, request):
    generation = await engine.generate(request)
    pieces = [piece async for piece in generation]
    return "".join(pieces), generation


def run(coro):
    return asyncio.run(coro)


def test_answers_a_question_at_temperature_zero(engine):
    text, gen = run(collect(engine, chat("What is 2+2?")))
    assert says_four(text), text
    assert gen.finish_reason == "stop"


def test_default_system_prompt_makes_the_model_answer_briefly(engine):
    text, gen = run(collect(engine, chat("What is the capital of France?", max_tokens=40)))
    assert says_paris(text), text
    assert gen.finish_reason == "stop"


def test_token_counts_come_from_the_real_tokenizer(engine):
    request = chat("Name a colour.", max_tokens=5, temperature=0.8, seed=7)
    text, gen = run(collect(engine, request))
    assert gen.prompt_tokens == len(engine.prepare(request))
    # The rendered ChatML prompt holds the system and user text plus the template's markers.
    assert gen.prompt_tokens > engine.count_tokens(DEFAULT_SYSTEM_PROMPT) + engine.count_tokens("Name a colour.")
    if gen.finish_reason == "length":
        assert gen.completion_tokens == 5
    assert abs(engine.count_tokens(text) - gen.completion_tokens) <= 1


def test_max_tokens_ends_with_length(engine):
    text, gen = run(collect(engine, chat("Write a long story about a dragon.", max_tokens=3)))
    assert (gen.finish_reason, gen.completion_tokens) == ("length", 3)
    assert text


def test_same_seed_same_text(engine):
    request = chat("Invent a name for a cat.", temperature=1.2, seed=1234, max_tokens=12)
    first, _ = run(collect(engine, request))
    second, _ = run(collect(engine, request))
    assert first == second


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    prompt = "Count from 1 to 10, separated by commas."
    unstopped, _ = run(collect(engine, chat(prompt, max_tokens=30)))
    # The stop string is taken from this machine's own greedy answer, so the test holds whatever it says.
    middle = next(i for i in range(len(unstopped) // 2, len(unstopped)) if not unstopped[i].isspace())
    stop = unstopped[middle:middle + 2]
    text, gen = run(collect(engine, chat(prompt, max_tokens=30, stop=(stop,))))
    assert gen.finish_reason == "stop"
    assert stop not in text
    assert text == unstopped[:unstopped.index(stop)]


def test_raw_prompt_completion(engine):
    request = GenerationRequest(params=SamplingParams(max_tokens=4, temperature=0.0), prompt="The capital of France is")
    text, gen = run(collect(engine, request))
    assert says_paris(text), text
    assert gen.prompt_tokens == len(engine.prepare(request))


def test_prompt_that_does_not_fit_the_context_is_refused(engine):
    with pytest.raises(ContextLengthExceeded) as err:
        run(engine.generate(chat("word " * 2100, max_tokens=10)))
    assert "context holds 2048 tokens" in str(err.value)


def test_cancelling_frees_the_engine_within_a_few_tokens(engine):
    async def scenario():
        long = await engine.generate(chat("Write a very long essay about the sea.", max_tokens=400, temperature=0.7))
        pieces = 0
        async for _ in long:
            pieces += 1
            if pieces == 3:
                long.cancel()
        # After cancel the stream ends on its own; it must not run on to max_tokens.
        assert long.finish_reason is None
        assert long.completion_tokens == 0 or long.completion_tokens < 10
        text, gen = await collect(engine, chat("What is 2+2?"))
        return pieces, text

    pieces, text = run(scenario())
    assert pieces < 10
    assert says_four(text), text


def test_queue_is_bounded(model_file):
    
    with own_engine(model_file, max_queued=1, max_concurrent=1) as small:
        async def scenario():
            first = await small.generate(chat("Tell me about whales.", max_tokens=64))
            await first.__anext__()  # the worker holds the first job; the queue is empty again
            second = await small.generate(chat("Tell me about whales.", max_tokens=8))
            with pytest.raises(EngineOverloaded):
                await small.generate(chat("Tell me about whales.", max_tokens=8))
            await first.aclose()
            await second.aclose()

        run(scenario())


def test_model_info_is_read_from_the_gguf(engine, model_file):
    info = engine.info
    assert info.quantization == "Q4_1"
    assert info.revision == model_file[1][:12]
    assert 100_000_000 < info.parameters < 200_000_000
    assert info.context_length == 2048
    assert "SmolLM2" in info.name
