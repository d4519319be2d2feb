"""Continuous batching in the embedded engine, against the real model: isolation, repeatability alone vs batched
and with vs without a reused prefix, cancellation, admission, text assembly, memory."""

import asyncio
import resource

import pytest
from conftest import own_engine

from inference.config import DEFAULT_SYSTEM_PROMPT
from inference.engine.base import ChatMessage, EngineOverloaded, GenerationRequest, SamplingParams
from inference.engine.llama.sequence import Finished, Sequence

QUESTIONS = [
    "What is 2+2?", "Name three colours.", "Write a haiku about rain.", "What is the capital of Spain?",
    "Count from 1 to 10.", "Tell me a joke.", "Why is the sea salty?", "Explain gravity briefly.",
]


def chat(prompt, system=DEFAULT_SYSTEM_PROMPT, **params):
    params.setdefault("max_tokens", 24)
    params.setdefault("temperature", 0.0)
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", prompt),)
    return GenerationRequest(params=SamplingParams(**params), messages=messages)


async def collect(engine, request, cancel_after=None):
    generation = await engine.generate(request)
    pieces = []
    async for piece in generation:
        pieces.append(piece)
        if cancel_after is not None and len(pieces) == cancel_after:
            generation.cancel()
    return "".join(pieces), generation


def alone(engine, request):
    return asyncio.run(collect(engine, request))


def together(engine, requests):
    async def scenario():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    return asyncio.run(scenario())


def test_eight_concurrent_prompts_each_get_the_answer_they_get_alone(engine):
    requests = [chat(q) for q in QUESTIONS]
    solo = [alone(engine, r)[0] for r in requests]
    batched = together(engine, requests)
    assert [text for text, _ in batched] == solo
    assert all(gen.finish_reason in ("stop", "length") for _, gen in batched)
    assert len(set(solo)) == len(solo)  # eight different answers: no request saw another's tokens


def test_seeded_sampling_is_the_same_alone_and_batched(engine):
    requests = [chat(q, temperature=0.9, seed=100 + i) for i, q in enumerate(QUESTIONS[:4])]
    solo = [alone(engine, r)[0] for r in requests]
    assert [text for text, _ in together(engine, requests)] == solo


def test_a_reused_system_prompt_gives_the_same_answer(model_file):
    with own_engine(model_file, max_concurrent=2) as fresh:
        first, gen_first = alone(fresh, chat("Name a large animal."))
        assert gen_first.reused_prompt_tokens == 0  # nothing cached yet: evaluated whole
        again, gen_again = alone(fresh, chat("Name a large animal."))
        other, gen_other = alone(fresh, chat("What is 2+2?"))
    # The system message is a prefix every request shares: the second and third reuse it.
    assert gen_again.reused_prompt_tokens > 0 and gen_other.reused_prompt_tokens > 0
    assert fresh.prompt_tokens_reused == gen_again.reused_prompt_tokens + gen_other.reused_prompt_tokens
    assert again == first
    # The same question on the shared engine, which has never seen this cache, answers the same.
    assert other == alone_on_engine_fixture(model_file, "What is 2+2?")


def alone_on_engine_fixture(model_file, question):
    with own_engine(model_file, max_concurrent=1) as cold:
        text, gen = alone(cold, chat(question))
        assert gen.reused_prompt_tokens == 0
        return text


def test_multi_turn_history_is_reused_and_answers_the_same(engine):
    turn1 = chat("Name a fruit.")
    reply, _ = alone(engine, turn1)
    history = turn1.messages + (ChatMessage("assistant", reply), ChatMessage("user", "What colour is it?"))
    request = GenerationRequest(params=turn1.params, messages=history)
    first, gen_first = alone(engine, request)
    second, gen_second = alone(engine, request)
    assert gen_second.reused_prompt_tokens >= gen_first.reused_prompt_tokens > 0
    assert first == second


def test_cancelling_one_sequence_leaves_the_others_untouched(engine):
    requests = [chat(q, max_tokens=32) for q in QUESTIONS[:3]]
    solo = [alone(engine, r)[0] for r in requests]

    async def scenario():
        return await asyncio.gather(collect(engine, requests[0]), collect(engine, requests[1], cancel_after=2),
                                    collect(engine, requests[2]))

    results = asyncio.run(scenario())
    assert results[1][1].finish_reason is None and results[1][1].completion_tokens < 10
    assert [results[0][0], results[2][0]] == [solo[0], solo[2]]


def test_requests_beyond_the_slots_wait_and_beyond_the_queue_are_refused(model_file):
    with own_engine(model_file, max_concurrent=2, max_queued=1) as small:
        async def scenario():
            running = []
            for _ in range(2):
                running.append(await small.generate(chat("Tell me about whales.", max_tokens=64)))
                await running[-1].__anext__()  # generating: admitted, the queue is empty again
            waiting = await small.generate(chat("Tell me about whales.", max_tokens=4))
            assert small.queue_depth == 1
            with pytest.raises(EngineOverloaded):
                await small.generate(chat("Tell me about whales.", max_tokens=4))
            for generation in running:
                await generation.aclose()
            text = "".join([piece async for piece in waiting])  # admitted once a slot frees
            return text, waiting

        text, waiting = asyncio.run(scenario())
        assert text and waiting.finish_reason == "length"


def fed(params, pieces, finish):
    """What a sequence hands the event loop when fed these token bytes, and add_text's stop answers."""
    sequence = Sequence([1], (), params, 0)
    stopped = [sequence.add_text(piece) for piece in pieces]
    sequence.finish(finish, stopped=any(stopped))
    return [item for _, item in sequence.outbox], stopped


def test_n_choices_start_from_a_copy_of_the_first_ones_prompt(engine):
    async def scenario(request, n):
        generations = await engine.generate_many(request, n)
        texts = await asyncio.gather(*(_text(g) for g in generations))
        return texts, generations

    question = "Tell me about the moon in one sentence."
    greedy = chat(question, max_tokens=16)
    texts, generations = asyncio.run(scenario(greedy, 3))
    assert texts == [alone(engine, greedy)[0]] * 3  # the copied prompt gives exactly what evaluating it gives
    prompt = generations[0].prompt_tokens
    assert [g.reused_prompt_tokens for g in generations[1:]] == [prompt, prompt]  # copied, not evaluated again
    # Seeded: choice i is the answer to the same request with seed + i, so choices differ and repeat.
    seeded = chat(question, max_tokens=16, temperature=0.9, seed=7)
    texts, _ = asyncio.run(scenario(seeded, 3))
    assert texts == [alone(engine, chat(question, max_tokens=16, temperature=0.9, seed=7 + i))[0] for i in range(3)]
    assert len(set(texts)) > 1


def test_choices_beyond_the_free_slots_wait_and_still_answer(model_file):
    with own_engine(model_file, max_concurrent=2, max_queued=8) as small:
        async def scenario():
            generations = await small.generate_many(chat("Name a fruit.", max_tokens=8), 4)
            return await asyncio.gather(*(_text(g) for g in generations)), generations

        texts, generations = asyncio.run(scenario())
        assert len(set(texts)) == 1 and texts[0]
        assert all(g.finish_reason in ("stop", "length") for g in generations)


def test_logprobs_are_the_models_distribution_and_only_computed_when_asked(engine):
    text, generation = alone(engine, chat("What is 2+2?", max_tokens=12, logprobs=3))
    entries = generation.logprobs
    assert len(entries) == generation.completion_tokens
    assert b"".join(e.token for e in entries).decode() == text  # one entry per token, in order
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob))
    assert alone(engine, chat("What is 2+2?", max_tokens=12))[1].logprobs == []


async def _text(generation):
    return "".join([piece async for piece in generation])


def test_utf8_split_across_tokens_is_assembled_before_it_is_sent():
    encoded = "日本 ☕".encode()
    items, stopped = fed(SamplingParams(max_tokens=8), [encoded[i:i + 1] for i in range(len(encoded))], "length")
    assert not any(stopped)  # one byte per token, the worst case
    text = [item for item in items if isinstance(item, str)]
    assert "".join(text) == "日本 ☕" and all("\ufffd" not in piece for piece in text)
    assert isinstance(items[-1], Finished)


def test_stop_sequence_spanning_tokens_is_cut_and_never_sent():
    items, stopped = fed(SamplingParams(max_tokens=8, stop=("lo Wo",)), [b"Hel", b"lo W", b"orld"], "stop")
    assert stopped == [False, False, True]
    assert "".join(i for i in items if isinstance(i, str)) == "Hel"


def test_no_memory_growth_across_a_thousand_requests(engine):
    def rss_mb(pid="self"):
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 1e6

    async def wave(start):
        requests = [GenerationRequest(params=SamplingParams(max_tokens=2, temperature=0.8, seed=n),
                                      prompt=f"Number {n} is") for n in range(start, start + 8)]
        await asyncio.gather(*(collect(engine, r) for r in requests))

    async def run(waves, offset):
        for w in range(waves):
            await wave(offset + w * 8)

    asyncio.run(run(13, 0))  # warm up: every slot used, allocator pools filled
    before = rss_mb(), rss_mb(engine.pid)  # this (the HTTP) process, and the engine process
    asyncio.run(run(125, 1000))  # 1,000 requests
    growth = rss_mb() - before[0], rss_mb(engine.pid) - before[1]
    assert growth[0] < 25, f"the HTTP process's resident memory grew by {growth[0]:.1f} MB over 1,000 requests"
    assert growth[1] < 25, f"the engine process's resident memory grew by {growth[1]:.1f} MB over 1,000 requests"
