"""The upstream backend end to end: `python -m inference` with MODEL_BACKEND=openai in front of a second
instance of this service (a real OpenAI-compatible server running the embedded model)."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from conftest import ServerProcess, says_four, says_paris, tokens_for_a_client_leaving_after


@pytest.fixture(scope="module")
def gateway(live):
    proc = ServerProcess({"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"{live.url}/v1", "UPSTREAM_API_KEY": "k"})
    try:
        proc.wait_ready(timeout=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def sdk(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(live):
    return live.app.service.engine.info.name


def ask(prompt):
    return [{"role": "user", "content": prompt}]


def test_gateway_discovers_and_serves_the_upstream_model(sdk, model_id, gateway):
    assert [m.id for m in sdk.models.list().data] == [model_id]
    card = httpx.get(f"{gateway.url}/api/v1/model").json()
    assert card["backend"] == "openai-upstream" and card["model_name"] == model_id


def test_chat_through_the_gateway_equals_the_upstream_answer(sdk, live, model_id):
    kwargs = dict(model=model_id, messages=ask("What is 2+2?"), temperature=0, max_tokens=20)
    via_gateway = sdk.chat.completions.create(**kwargs)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as direct:
        upstream = direct.chat.completions.create(**kwargs)
    assert via_gateway.choices[0].message.content == upstream.choices[0].message.content
    assert via_gateway.usage.model_dump() == upstream.usage.model_dump()
    assert via_gateway.choices[0].finish_reason == upstream.choices[0].finish_reason


def test_streaming_through_the_gateway(sdk, model_id):
    kwargs = dict(model=model_id, messages=ask("Name three colours."), temperature=0, max_tokens=20)
    whole = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert len(chunks) > 5
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_vllm_s_benchmark_extensions_reach_the_upstream(sdk, model_id):
    """ignore_eos and min_tokens are sent on (the upstream, this service, runs the answer to max_tokens), and usage
    in every chunk is asked of the upstream and passed on as it comes."""
    chunks = list(sdk.chat.completions.create(
        model=model_id, messages=ask("What is 2+2?"), temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 16 and all(chunk.usage is not None for chunk in chunks)
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and len(set(counts)) > 2  # it grew as the upstream counted
    text = sdk.completions.create(model=model_id, prompt="What is 2+2?", temperature=0, max_tokens=40, stop=["."],
                                  extra_body={"min_tokens": 30})
    assert text.usage.completion_tokens >= 30


def test_completions_and_native_api_through_the_gateway(sdk, gateway, model_id):
    text = sdk.completions.create(model=model_id, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert says_paris(text.choices[0].text)
    answer = httpx.post(f"{gateway.url}/api/v1/infer", json={"prompt": "What is 2+2?", "temperature": 0}, timeout=60)
    assert answer.status_code == 200 and says_four(answer.json()["output"])


def test_upstream_refusals_pass_through(sdk, model_id):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=model_id, messages=ask("word " * 2100), max_tokens=10)
    assert "context" in err.value.message


def test_gateway_disconnect_stops_the_upstream_generation(gateway, model_id, engine):
    body = {"model": model_id, "messages": ask("Write a very long essay about rivers."), "max_tokens": 800,
            "temperature": 0.8, "stream": True}
    produced = tokens_for_a_client_leaving_after(5, engine, f"{gateway.url}/v1/chat/completions", body)
    assert produced < 40, f"the upstream generated {produced} tokens for a client that left after 5"


def test_upstream_down_is_a_502_not_a_hang(free_port_factory):
    port = free_port_factory()  # nothing listens there
    proc = ServerProcess({"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"http://127.0.0.1:{port}/v1",
                          "UPSTREAM_MODEL": "some-model"})
    try:
        proc.wait_ready(timeout=60)
        with openai.OpenAI(base_url=f"{proc.url}/v1", api_key="x", max_retries=0, timeout=30) as client:
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model="some-model", messages=ask("Hi"))
        assert err.value.status_code == 502
        assert err.value.body["code"] == "upstream_unavailable"
        native = httpx.post(f"{proc.url}/api/v1/infer", json={"prompt": "Hi"}, timeout=30)
        assert native.status_code == 502 and native.json()["error"]["code"] == "upstream_unavailable"
    finally:
        proc.stop()


def test_upstream_that_never_answers_is_a_504(free_port_factory):
    # A real listening socket that accepts connections and never replies: the worst kind of slow upstream.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    proc = ServerProcess({"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"http://127.0.0.1:{port}/v1",
                          "UPSTREAM_MODEL": "slow", "UPSTREAM_TIMEOUT_SECONDS": "1"})
    try:
        proc.wait_ready(timeout=60)
        for stream in (False, True):
            response = httpx.post(f"{proc.url}/v1/chat/completions", timeout=30,
                                  json={"model": "slow", "messages": ask("Hi"), "stream": stream})
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "upstream_timeout"
    finally:
        proc.stop()
        stop.set()
        acceptor.join()
        for conn in held:
            conn.close()
        listener.close()


def test_slow_upstream_generation_is_a_504(live, model_id):
    proc = ServerProcess({"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"{live.url}/v1",
                          "UPSTREAM_TIMEOUT_SECONDS": "1"})
    try:
        proc.wait_ready(timeout=60)
        # 400 tokens (ignore_eos: never fewer) take seconds upstream; the whole answer cannot arrive within the
        # 1 s read timeout.
        response = httpx.post(f"{proc.url}/v1/chat/completions", timeout=60, json={
            "model": model_id, "messages": ask("Write a long essay about forests."), "max_tokens": 400,
            "temperature": 0.8, "ignore_eos": True})
        assert response.status_code == 504, response.text
    finally:
        proc.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_deadline_bounds_the_upstream_exchange(gateway, model_id, stream):
    """X-Request-Timeout through the gateway: waiting for the upstream's status line (a whole answer), or reading
    its stream once it has begun, ends at the deadline with the service's own timeout, not the upstream's."""
    body = {"model": model_id, "messages": ask("Write a long essay about forests."), "max_tokens": 600,
            "temperature": 0.8, "stream": stream, "ignore_eos": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"X-Request-Timeout": "1.5"}) as response:
        text = response.read().decode()
    elapsed = time.monotonic() - started
    if stream:  # begun: the stream ends with an error event, not [DONE]
        assert response.status_code == 200 and "[DONE]" not in text
        assert '"code": "timeout"' in text or '"code":"timeout"' in text, text[-300:]
    else:
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout", text
    assert 1.4 < elapsed < 10


def test_gateway_needs_an_upstream_url():
    from inference.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="UPSTREAM_URL"):
        Settings.from_env({"MODEL_BACKEND": "openai"}, env_file=None)


def test_structured_output_and_sampling_fields_pass_through(sdk, model_id):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    kwargs = dict(model=model_id, messages=ask("Pick a colour."), temperature=0, max_tokens=20, frequency_penalty=1,
                  logit_bias={"1": -5}, response_format={"type": "json_schema",
                                                          "json_schema": {"name": "pick", "schema": schema}})
    reply = sdk.chat.completions.create(**kwargs)
    assert json.loads(reply.choices[0].message.content)["colour"] in ("red", "green", "blue")
    # The upstream enforces what the gateway passes on: its refusal comes back in the same shape.
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**{**kwargs, "response_format": {"type": "json_schema", "json_schema": {
            "name": "pick", "schema": {"type": "array", "uniqueItems": True}}}})
    assert err.value.body["param"] == "response_format"


def test_logprobs_and_n_through_the_gateway(sdk, live, model_id):
    kwargs = dict(model=model_id, messages=ask("Name a fruit."), temperature=0.9, seed=11, max_tokens=10,
                  logprobs=True, top_logprobs=2, n=2)
    via_gateway = sdk.chat.completions.create(**kwargs)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as direct:
        upstream = direct.chat.completions.create(**kwargs)
        text = direct.completions.create(model=model_id, prompt="Apples are", max_tokens=4, temperature=0, logprobs=2)
    assert [c.message.content for c in via_gateway.choices] == [c.message.content for c in upstream.choices]
    assert [c.logprobs.model_dump() for c in via_gateway.choices] == [c.logprobs.model_dump() for c in upstream.choices]
    assert via_gateway.usage.completion_tokens == upstream.usage.completion_tokens
    streamed = []
    for chunk in sdk.chat.completions.create(**{**kwargs, "n": 1}, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content or []
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in upstream.choices[0].logprobs.content]
    completion = sdk.completions.create(model=model_id, prompt="Apples are", max_tokens=4, temperature=0, logprobs=2)
    assert completion.choices[0].logprobs.model_dump() == text.choices[0].logprobs.model_dump()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
                   "additionalProperties": False}}}


def test_tool_calls_pass_through_the_gateway(sdk, live, model_id):
    kwargs = dict(model=model_id, messages=ask("What's the weather in Paris?"), tools=[WEATHER_TOOL], temperature=0,
                  max_tokens=40, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    via_gateway = sdk.chat.completions.create(**kwargs)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as direct:
        upstream = direct.chat.completions.create(**kwargs)
        (call,) = upstream.choices[0].message.tool_calls
        history = [*kwargs["messages"], {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
        answer = direct.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=20)
    assert via_gateway.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in via_gateway.choices[0].message.tool_calls] == [
        (call.function.name, call.function.arguments)]
    # Streamed through the gateway, the deltas assemble to the same call.
    name, arguments, finish = "", "", None
    for chunk in sdk.chat.completions.create(**kwargs, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert (name, arguments, finish) == (call.function.name, call.function.arguments, "tool_calls")
    # The history's tool turns reach the upstream as they were sent: the same answer as asking it directly.
    relayed = sdk.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=20)
    assert relayed.choices[0].message.content == answer.choices[0].message.content
    # "auto" goes to the upstream as it was sent, and the upstream decides: the same answer as asking it directly.
    auto = {**kwargs, "tool_choice": "auto"}
    through = sdk.chat.completions.create(**auto).choices[0]
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as direct:
        straight = direct.chat.completions.create(**auto).choices[0]
    assert (through.finish_reason, through.message.content) == (straight.finish_reason, straight.message.content)
    assert [(c.function.name, c.function.arguments) for c in through.message.tool_calls or ()] == [
        (c.function.name, c.function.arguments) for c in straight.message.tool_calls or ()]


# A reasoning model's answers as vLLM sends them (its OpenAI server with a reasoning parser: `reasoning_content` in
# the message, `delta.reasoning_content` while streaming), replayed by a recording peer: vLLM and a reasoning model
# cannot run here. The peer also keeps each request body, to show what the gateway forwards.
REASONING_MODEL = "Qwen/Qwen3-0.6B"
RECORDED_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": REASONING_MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4.",
                             "tool_calls": []}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}
RECORDED_STREAM = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": "2 and 2"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": " make 4."}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "4"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}},
]


@pytest.fixture(scope="module")
def reasoning_upstream():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Peer(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body, content_type="application/json"):
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply(json.dumps({"object": "list", "data": [{"id": REASONING_MODEL, "object": "model"}]}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.append(body)
            if body.get("stream"):
                events = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                           "model": REASONING_MODEL, **chunk} for chunk in RECORDED_STREAM]
                self.reply(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                           + b"data: [DONE]\n\n", "text/event-stream")
            else:
                self.reply(json.dumps(RECORDED_ANSWER).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proc = ServerProcess({"MODEL_BACKEND": "openai",
                          "UPSTREAM_URL": f"http://127.0.0.1:{server.server_address[1]}/v1"})
    try:
        proc.wait_ready(timeout=60)
        yield proc, received
    finally:
        proc.stop()
        server.shutdown()
        server.server_close()


def test_the_gateway_forwards_what_it_does_not_use_itself(reasoning_upstream):
    gateway, received = reasoning_upstream
    extras = {"user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "conv-7", "metadata": {"team": "a"},
              "store": True, "service_tier": "flex", "reasoning_effort": "high", "verbosity": "low",
              "parallel_tool_calls": False, "chat_template_kwargs": {"enable_thinking": True}, "top_k": 20}
    body = {"model": REASONING_MODEL, "max_tokens": 50, **extras,
            "messages": [{"role": "user", "content": "What is 2+2?", "name": "ann"}]}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    sent = received[-1]
    for name, value in extras.items():
        assert sent[name] == value, name
    assert sent["messages"][-1] == {"role": "user", "content": "What is 2+2?", "name": "ann"}
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                         json={**body, "audio": {"voice": "alloy", "format": "wav"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "audio"


def test_an_upstream_models_reasoning_comes_back(reasoning_upstream):
    gateway, _ = reasoning_upstream
    body = {"model": REASONING_MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 50}
    whole = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30).json()
    message = whole["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("4", "2 and 2 make 4.")
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=30) as client:
        chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("2 and 2 make 4.", "4")
    first_reasoning = next(i for i, d in enumerate(deltas) if getattr(d, "reasoning_content", None))
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert first_reasoning < first_content  # passed on as it came, not held until the answer
    native = httpx.post(f"{gateway.url}/api/v1/infer", json={"prompt": "What is 2+2?", "max_tokens": 50},
                        timeout=30).json()
    assert (native["output"], native["reasoning"]) == ("4", "2 and 2 make 4.")  # the native API's chat, upstream


def test_anthropic_messages_through_the_gateway(gateway, live, model_id):
    """The gateway translates /v1/messages into the upstream's chat completions and back: the same answer as the
    upstream gives to the same Anthropic request, streamed or not; a tool use comes back as a tool_use block."""
    import anthropic

    kwargs = dict(model=model_id, max_tokens=20, messages=ask("What is 2+2?"), extra_body={"temperature": 0})
    with anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0) as via, \
            anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0) as direct:
        through, straight = via.messages.create(**kwargs), direct.messages.create(**kwargs)
        assert through.content[0].text == straight.content[0].text and through.stop_reason == straight.stop_reason
        assert (through.usage.input_tokens, through.usage.output_tokens) == (
            straight.usage.input_tokens, straight.usage.output_tokens)
        with via.messages.stream(**kwargs) as stream:
            assert "".join(stream.text_stream) == straight.content[0].text
        tool = {"name": "get_weather", "description": "Weather in a city.",
                "input_schema": WEATHER_TOOL["function"]["parameters"]}
        named = dict(kwargs, messages=ask("What's the weather in Paris?"), max_tokens=40, tools=[tool],
                     tool_choice={"type": "tool", "name": "get_weather"})
        used, expected = via.messages.create(**named), direct.messages.create(**named)
        assert used.stop_reason == "tool_use" and [(b.name, b.input) for b in used.content] == [
            (b.name, b.input) for b in expected.content]
        with pytest.raises(anthropic.APIStatusError) as unsupported:  # the upstream's tokenizer is not here
            via.messages.count_tokens(model=model_id, messages=ask("Hi"))
        assert unsupported.value.status_code == 501 and unsupported.value.body["type"] == "error"


def test_responses_through_the_gateway_are_stored_at_the_gateway(sdk, live, model_id):
    """Translated to the upstream's chat completions; the conversation is the gateway's, so the upstream has never
    heard of the response a follow-up continues."""
    kwargs = dict(model=model_id, max_output_tokens=16, temperature=0)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60) as direct:
        through, straight = sdk.responses.create(input="What is 2+2?", **kwargs), \
            direct.responses.create(input="What is 2+2?", **kwargs)
        assert through.output_text == straight.output_text and through.usage.output_tokens == straight.usage.output_tokens
        follow = sdk.responses.create(input="And 3+3?", previous_response_id=through.id, **kwargs)
        assert follow.usage.input_tokens > through.usage.input_tokens + through.usage.output_tokens
        with pytest.raises(openai.NotFoundError):
            direct.responses.retrieve(through.id)


@pytest.fixture(scope="module")
def passthrough(live):
    proc = ServerProcess({"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"{live.url}/v1",
                          "UPSTREAM_PASSTHROUGH": "messages,responses", "API_KEYS": "key-ann-1234,key-bob-5678"})
    try:
        proc.wait_ready(timeout=60)
        yield proc
    finally:
        proc.stop()


def _tokens_counted(url):
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inference_tokens_total{"))


def test_passthrough_sends_messages_and_responses_on_unchanged(passthrough, live, model_id):
    """UPSTREAM_PASSTHROUGH: the upstream (here this service's own /v1/messages and /v1/responses) gets the request
    as sent and the client its answer as the upstream wrote it; stored responses are the upstream's, readable
    through the gateway by the API key that made them only. The usage those answers report is counted as the
    gateway's own."""
    import anthropic

    before = _tokens_counted(passthrough.url)
    kwargs = dict(model=model_id, max_tokens=20, messages=ask("What is 2+2?"), extra_body={"temperature": 0})
    with anthropic.Anthropic(base_url=passthrough.url, api_key="key-ann-1234", max_retries=0) as via, \
            anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0) as direct:
        through, straight = via.messages.create(**kwargs), direct.messages.create(**kwargs)
        assert through.content == straight.content and through.usage == straight.usage
        with via.messages.stream(**kwargs) as stream:
            assert "".join(stream.text_stream) == straight.content[0].text
        counted = via.messages.count_tokens(model=model_id, messages=ask("What is 2+2?"))  # the upstream's count
        assert counted.input_tokens == direct.messages.count_tokens(model=model_id,
                                                                    messages=ask("What is 2+2?")).input_tokens > 0
        with pytest.raises(anthropic.BadRequestError) as refused:  # the upstream's refusal, in Anthropic's shape
            via.messages.create(**{**kwargs, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]})
        assert "image" in refused.value.message and refused.value.body["type"] == "error"
    with openai.OpenAI(base_url=f"{passthrough.url}/v1", api_key="key-ann-1234", max_retries=0) as gateway_sdk, \
            openai.OpenAI(base_url=f"{passthrough.url}/v1", api_key="key-bob-5678", max_retries=0) as bob, \
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60) as direct_sdk:
        response = gateway_sdk.responses.create(model=model_id, input="Say hi.", max_output_tokens=8)
        assert direct_sdk.responses.retrieve(response.id).output_text == response.output_text  # the upstream's
        assert gateway_sdk.responses.retrieve(response.id).id == response.id
        for call in (lambda: bob.responses.retrieve(response.id), lambda: bob.responses.delete(response.id),
                     lambda: bob.responses.create(model=model_id, input="Hi", previous_response_id=response.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert [i.type for i in gateway_sdk.responses.input_items.list(response.id).data] == ["message"]
        with gateway_sdk.responses.stream(model=model_id, input="Say hi.", max_output_tokens=8,
                                          previous_response_id=response.id) as stream:
            events = [event.type for event in stream]
        assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
        gateway_sdk.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            direct_sdk.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):  # the gateway checks the model it serves
            gateway_sdk.responses.create(model="gpt-9", input="Hi", max_output_tokens=4)
    assert _tokens_counted(passthrough.url) > before
