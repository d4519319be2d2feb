"""Admission in the embedded engine: clients served in turn, deadlines in the queue and while generating, and the
Retry-After an overloaded refusal carries."""

import asyncio
import time

import pytest
from conftest import own_engine

from inference.engine.base import (
    ChatMessage,
    EngineOverloaded,
    GenerationRequest,
    InvalidPrompt,
    PromptTooLong,
    QueueTimeout,
    RequestTimeout,
    SamplingParams,
)
from inference.engine.llama.admission import DrainRate, FairQueue
from inference.engine.llama.sequence import Sequence


def job(client, size=1):
    return [Sequence([1], (), SamplingParams(max_tokens=1), 0, client=client) for _ in range(size)]


def test_the_queue_serves_clients_in_turn_and_keeps_a_requests_choices_together():
    queue = FairQueue()
    flood = [job("a") for _ in range(5)]
    for j in flood:
        queue.push(j)
    other, pair = job("b"), job("c", 2)
    queue.push(other)
    queue.push(pair)
    order = [queue.pop() for _ in range(len(queue))]
    assert order == [flood[0][0], other[0], pair[0], pair[1], flood[1][0], flood[2][0], flood[3][0], flood[4][0]]
    assert queue.pop() is None and len(queue) == 0
    # A client just served goes behind one that has not been, however many requests it has queued.
    queue.push(flood[0])
    assert queue.pop() is flood[0][0]
    for j in flood[1:]:
        queue.push(j)
    queue.push(other)
    assert queue.pop() is other[0]


def test_removing_expired_sequences_keeps_the_rest_in_order():
    queue = FairQueue()
    jobs = [job("a"), job("b", 2), job("a")]
    for j in jobs:
        queue.push(j)
    doomed = {id(jobs[0][0]), id(jobs[1][1])}
    assert queue.remove(lambda s: id(s) in doomed) == [jobs[0][0], jobs[1][1]]
    assert len(queue) == 2 and [queue.pop(), queue.pop()] == [jobs[1][0], jobs[2][0]]


def test_retry_after_is_the_time_the_queue_ahead_takes_to_drain():
    rate = DrainRate()
    assert rate.retry_after(10, 0.0) == 1  # nothing measured yet
    for i in range(11):
        rate.record(i * 0.5)  # a slot freed every half second
    assert rate.retry_after(9, 5.0) == 5  # 10 completions to wait for, at 2.2 a second
    assert rate.retry_after(1000, 5.0) == 60  # bounded
    assert rate.retry_after(0, 5.0) == 1


def test_retry_after_an_idle_spell_is_paced_by_busy_time_not_by_the_spell():
    rate = DrainRate()
    for i in range(11):
        rate.record(i * 0.5)  # busy: a slot freed every half second
    rate.idle(5.0)  # then nothing for an hour
    rate.busy(3605.0)  # a burst arrives
    assert rate.retry_after(9, 3605.0) == 5  # the pace from before the quiet hour (was 60: the hour counted)
    rate.record(3606.0)  # busy time goes on from where it stopped
    assert rate.retry_after(9, 3606.0) == 5
    rate.idle(3606.0)
    rate.idle(3700.0)  # told twice: the spell started at the first
    rate.busy(7206.0)
    assert rate.retry_after(9, 7206.0) == 5


def chat(prompt, **params):
    params.setdefault("temperature", 0.0)
    return SamplingParams(**params), (ChatMessage("user", prompt),)


def request(prompt, client="", deadline=None, **params):
    sampling, messages = chat(prompt, **params)
    return GenerationRequest(sampling, messages=messages, client=client, deadline=deadline)


async def first_token_order(engine, requests):
    """Submit `requests` in order; return the indexes in the order their first tokens arrived."""
    order = []
    generations = [await engine.generate(r) for r in requests]

    async def watch(i, generation):
        async for _ in generation:
            if i not in order:
                order.append(i)
        if i not in order:
            order.append(i)

    await asyncio.gather(*(watch(i, g) for i, g in enumerate(generations)))
    return order


def test_a_flooding_client_cannot_starve_another(model_file):
    with own_engine(model_file, max_concurrent=1, max_queued=16) as engine:
        flood = [request(f"Count to {i + 3}.", client="ip:flood", max_tokens=6) for i in range(6)]
        late = request("Name a fruit.", client="ip:other", max_tokens=6)
        order = asyncio.run(first_token_order(engine, flood + [late]))
    # The other client's request came last but starts second: right after the flood's running one.
    assert order.index(6) == 1, order


def test_a_request_waiting_past_the_queue_timeout_is_dropped_without_running(model_file):
    with own_engine(model_file, max_concurrent=1, queue_timeout=0.2) as engine:
        async def scenario():
            running = await engine.generate(request("Tell me about whales.", max_tokens=400))
            await running.__anext__()  # it holds the only slot
            waiting = await engine.generate(request("Name a fruit.", max_tokens=4))
            with pytest.raises(QueueTimeout) as refused:
                await waiting.__anext__()
            await running.aclose()
            return waiting, refused.value

        waiting, refused = asyncio.run(scenario())
        assert waiting.completion_tokens == 0 and refused.retry_after >= 1
        assert engine.queue_depth == 0


def test_a_generation_past_its_deadline_is_stopped(model_file):
    with own_engine(model_file, max_concurrent=1) as engine:
        async def scenario():
            generation = await engine.generate(request("Tell me a long story.", deadline=time.monotonic() + 0.3,
                                                       max_tokens=400, logit_bias=((2, -100.0),)))
            pieces = []
            with pytest.raises(RequestTimeout):
                async for piece in generation:
                    pieces.append(piece)
            return pieces

        pieces = asyncio.run(scenario())
        assert pieces  # it ran, and was cut: 400 tokens take seconds here
        # The slot is free again at once.
        text = asyncio.run(_answer(engine, request("What is 2+2?", max_tokens=8)))
        assert text


def test_a_waiting_request_whose_deadline_passes_is_dropped(model_file):
    with own_engine(model_file, max_concurrent=1) as engine:
        async def scenario():
            running = await engine.generate(request("Tell me about whales.", max_tokens=400))
            await running.__anext__()
            waiting = await engine.generate(request("Name a fruit.", max_tokens=4, deadline=time.monotonic() + 0.1))
            with pytest.raises(RequestTimeout):
                await waiting.__anext__()
            await running.aclose()

        asyncio.run(scenario())


def test_an_overloaded_refusal_says_when_to_come_back(model_file):
    with own_engine(model_file, max_concurrent=1, max_queued=1) as engine:
        async def scenario():
            for _ in range(3):  # some completions, so the pace is known
                await _answer(engine, request("Hi", max_tokens=2))
            running = await engine.generate(request("Tell me about whales.", max_tokens=200))
            await running.__anext__()
            queued = await engine.generate(request("Hi", max_tokens=2))
            with pytest.raises(EngineOverloaded) as refused:
                await engine.generate(request("Hi", max_tokens=2))
            await running.aclose()
            await queued.aclose()
            return refused.value

        refused = asyncio.run(scenario())
        assert 1 <= refused.retry_after <= 60


async def _answer(engine, generation_request):
    generation = await engine.generate(generation_request)
    return "".join([piece async for piece in generation])


def test_a_queued_request_whose_client_left_never_runs(model_file):
    with own_engine(model_file, max_concurrent=1) as engine:
        async def scenario():
            running = await engine.generate(request("Tell me about whales.", max_tokens=400))
            await running.__anext__()
            left = await engine.generate(request("Name a fruit.", max_tokens=4))
            assert engine.queue_depth == 1
            left.cancel()  # the client hung up while waiting
            pieces = [piece async for piece in left]  # ends at the next expiry scan, without running
            depth = engine.queue_depth
            await running.aclose()
            return pieces, left, depth

        pieces, left, depth = asyncio.run(scenario())
    assert pieces == [] and left.finish_reason is None and left.completion_tokens == 0 and depth == 0


def test_a_burst_into_an_idle_engine_gets_every_slot_and_the_queue_and_the_rest_is_refused_unprepared(model_file):
    """Places are held from admission on: of a burst far larger than the room (the free slots plus the queue),
    exactly what fits is rendered and tokenized; the rest is refused at once. A request whose preparation fails
    gives its place back."""
    with own_engine(model_file, max_concurrent=2, max_queued=4) as engine:
        prepared = []
        prepare = engine._prepare

        def counting(request):
            prepared.append(request)
            return prepare(request)

        engine._prepare = counting  # observe how many requests reach the tokenizer
        bad = GenerationRequest(SamplingParams(max_tokens=2, logit_bias=((10**9, 1.0),)),
                                messages=[ChatMessage("user", "Hi")])
        with pytest.raises(InvalidPrompt):
            asyncio.run(engine.generate(bad))
        assert engine._admitted == 0 and prepared == [bad]
        prepared.clear()

        async def scenario():
            results = await asyncio.gather(*(engine.generate(request(f"Name fruit number {i}.", max_tokens=2))
                                             for i in range(60)), return_exceptions=True)
            accepted = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, EngineOverloaded)]
            for generation in accepted:  # each one admitted runs to its end (the engine process takes them all)
                async for _ in generation:
                    pass
            return accepted, refused

        accepted, refused = asyncio.run(scenario())
        assert all(generation.finish_reason in ("stop", "length") for generation in accepted)
        # 2 slots + 4 queue places (it was 4 of 60: admission counted the queue alone)
        assert (len(accepted), len(refused), len(prepared)) == (6, 54, 6)
        assert engine._admitted == 0


def test_a_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing(engine):
    limit = engine._max_prompt_chars
    longest = limit // engine.n_ctx
    assert 1 <= longest <= 256 and limit == engine.n_ctx * longest
    tokenized = []
    prepare = engine._prepare
    engine._prepare = lambda r: tokenized.append(r) or prepare(r)
    try:
        with pytest.raises(PromptTooLong) as refused:
            asyncio.run(engine.generate(request("x" * (limit + 1), max_tokens=2)))
    finally:
        del engine._prepare
    assert tokenized == [] and engine._admitted == 0
    assert f"holds at most {limit}" in str(refused.value) and refused.value.n_ctx == engine.n_ctx
