"""What a client received, sent back: agent loops return the assistant's content blocks (Anthropic) or output items
(the Responses API) as the SDK gave them to them, as objects or as `model_dump()`. Every block and item type the
installed SDKs can return has a decision here (used, with each of its fields known; or refused by type), so a newer
SDK that adds a type or a field nobody decided about fails these tests instead of a user's second request."""

import typing

import anthropic
import openai
import pytest
from anthropic.types import ContentBlock, DirectCaller, ServerToolCaller, TextBlock, ToolUseBlock
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseFunctionToolCallOutputItem,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
)

from inference.api.anthropic.schemas import BLOCK_FIELDS
from inference.api.anthropic.schemas import FIELDS as ANTHROPIC_FIELDS
from inference.api.responses.schemas import FIELDS as RESPONSES_FIELDS
from inference.api.responses.schemas import ITEM_FIELDS, PART_FIELDS

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}


def members(union):
    """The model classes of an SDK's discriminated union (Annotated[Union[...], ...])."""
    while typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    return [m for m in typing.get_args(union) if hasattr(m, "model_fields")]


def type_of(model):
    return typing.get_args(model.model_fields["type"].annotation)[0]


def names(model):
    """The names a field can come back under: the SDK's own (model_dump()) and the API's (by_alias)."""
    return {name for field_name, info in model.model_fields.items() for name in (field_name, info.alias) if name}


def undecided(models, fates, fields):
    """Types nobody decided about, and fields of used types this service does not know."""
    missing = []
    for model in models:
        kind = type_of(model)
        if kind not in fates:
            missing.append(f"type {kind!r} ({model.__name__})")
        elif fates[kind].embedded == "used":
            missing += [f"{kind}.{name}" for name in sorted(names(model) - set(fields[kind]))]
    return missing


def test_every_block_the_anthropic_sdk_can_return_has_a_decision():
    blocks = members(ContentBlock)
    assert {"text", "tool_use"} <= {type_of(m) for m in blocks}
    assert undecided(blocks, ANTHROPIC_FIELDS["block"], BLOCK_FIELDS) == []


def test_every_item_the_openai_sdk_can_return_has_a_decision():
    items = members(ResponseOutputItem)
    assert {"message", "function_call"} <= {type_of(m) for m in items}
    assert undecided(items, RESPONSES_FIELDS["item"], ITEM_FIELDS) == []
    assert undecided([ResponseOutputText, ResponseOutputRefusal], RESPONSES_FIELDS["part"], PART_FIELDS) == []
    # A tool's output item, as the SDK types it for a loop to send back.
    assert undecided([ResponseFunctionToolCallOutputItem], RESPONSES_FIELDS["item"], ITEM_FIELDS) == []


def test_the_checks_see_an_undecided_field_and_type():
    class Newer(ToolUseBlock):
        brand_new: str | None = None

    assert undecided([Newer], ANTHROPIC_FIELDS["block"], BLOCK_FIELDS) == ["tool_use.brand_new"]
    assert undecided([ResponseOutputMessage], {}, {}) == ["type 'message' (ResponseOutputMessage)"]


# --- the loops, end to end against the real model ---------------------------------------------------------------


@pytest.fixture
def claude(live):
    with anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(live):
    return live.app.service.engine.info.name


def test_the_anthropic_tool_loop_sends_back_what_it_received(claude, model):
    """The canonical loop: the assistant's content as it came (model_dump(), or the blocks themselves), then the
    tool results; and every field the SDK's blocks can carry, at the values that ask for nothing."""
    tools = [{"name": "get_weather", "description": "The current weather in a city.", "input_schema": WEATHER}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = claude.messages.create(model=model, max_tokens=60, messages=[question], tools=tools,
                                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    use = first.content[-1]
    assert use.type == "tool_use"
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}
    full = [TextBlock(type="text", text="Let me look.", citations=None),
            ToolUseBlock(type="tool_use", id=use.id, name=use.name, input=use.input, caller=DirectCaller(type="direct"),
                         toolset_name=None)]
    for content in ([b.model_dump() for b in first.content], first.content, [b.model_dump() for b in full], full):
        second = claude.messages.create(model=model, max_tokens=8, tools=tools, extra_body={"temperature": 0},
                                        messages=[question, {"role": "assistant", "content": content}, result])
        assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # A call the service could not have made (programmatic tool calling, at Anthropic) is still refused by name.
    server_called = ToolUseBlock(type="tool_use", id=use.id, name=use.name, input=use.input,
                                 caller=ServerToolCaller(type="code_execution_20250825", tool_id="srvtoolu_1"))
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=model, max_tokens=8, tools=tools, messages=[
            question, {"role": "assistant", "content": [server_called.model_dump()]}, result])
    assert "messages[1].content[0].caller" in refused.value.message


def test_the_responses_loop_sends_back_what_it_received(openai_client, model):
    """Output items sent back as input: the objects themselves (as `input += response.output`), model_dump() (the
    SDK's own names: `async_`) and the API's names; a function_call_output item as the SDK types it."""
    tools = [{"type": "function", "name": "get_weather", "description": "The current weather in a city.",
              "parameters": WEATHER}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = openai_client.responses.create(model=model, input=[question], tools=tools, tool_choice="required",
                                           temperature=0, max_output_tokens=60, store=False)
    call = next(item for item in first.output if item.type == "function_call")
    output = ResponseFunctionToolCallOutputItem(id="fco_1", type="function_call_output", call_id=call.call_id,
                                                output="sunny, 21 C", status="completed", name=call.name,
                                                created_by="agent", caller=None, namespace=None)
    answered = openai_client.responses.create(model=model, input="Say hello.", temperature=0, max_output_tokens=6,
                                              store=False)
    message = next(item for item in answered.output if item.type == "message")
    full = ResponseFunctionToolCall(type="function_call", id=call.id, call_id=call.call_id, name=call.name,
                                    arguments=call.arguments, status="completed", namespace=None, async_=False)
    for items in (first.output, [i.model_dump() for i in first.output],
                  [i.model_dump(by_alias=True) for i in first.output], [full.model_dump()]):
        second = openai_client.responses.create(
            model=model, tools=tools, temperature=0, max_output_tokens=8, store=False,
            input=[question, message.model_dump(), question, *items, output.model_dump()])
        assert second.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.responses.create(model=model, tools=tools, store=False, input=[
            question, {**call.model_dump(), "async": True}, output.model_dump()])
    assert refused.value.body["param"] == "input[1].async"


def test_the_agents_sdk_runs_a_tool_loop_against_the_service(live, model):
    """The OpenAI Agents SDK's own loop (Responses API): it calls the tool, then sends the call and its output back."""
    import asyncio

    import agents

    seen: list[list] = []

    class Hooks(agents.RunHooks):
        async def on_llm_start(self, context, agent, system_prompt, input_items):
            seen.append(list(input_items))

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"{city}: sunny, 21 C"

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(model=model, openai_client=client),
                             model_settings=agents.ModelSettings(tool_choice="required", temperature=0,
                                                                 max_tokens=60))
        try:
            return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=2, hooks=Hooks(),
                                           run_config=agents.RunConfig(tracing_disabled=True))
        except agents.MaxTurnsExceeded:  # the small model may call again: the loop's requests were all accepted
            return None
        finally:
            await client.close()

    asyncio.run(run())
    assert len(seen) >= 2
    sent_back = {item.get("type") for item in seen[1] if isinstance(item, dict)}
    assert {"function_call", "function_call_output"} <= sent_back
