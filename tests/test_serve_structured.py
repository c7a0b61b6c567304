"""response_format and tools over real HTTP, with the official ``openai`` SDK (its ``.parse()``, on every
engine: tests/structured_clients).

The tiny random checkpoint shows that the grammar, not the model, makes the
output valid; the demo checkpoint shows what a client sees.
"""

import json

import jsonschema
import openai
import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

KEY = "sk-test-key"
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "population": {"type": "integer", "minimum": 0, "maximum": 99999},
    "sights": {"type": "array", "items": {"enum": ["lake", "temple", "canal"]}, "maxItems": 3}},
    "required": ["city", "population", "sights"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    with running_server(build_app(tiny_dir, "tiny", api_key=KEY)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo():
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def test_chat_json_schema_answers_validate(tiny):
    finished = 0
    for seed in range(4):
        out = tiny.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A city, as JSON."}],
                                           response_format=_schema_format(SCHEMA), temperature=1.0, seed=seed,
                                           max_tokens=96)
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        else:
            assert choice.finish_reason == "length"
    assert finished >= 2


def test_completions_take_response_format(tiny):
    out = tiny.completions.create(model="tiny", prompt="JSON:", max_tokens=64, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)
    else:
        assert out.choices[0].finish_reason == "length"


def test_required_tool_choice_answers_with_a_call(demo):
    out = demo.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Weather in Hangzhou?"}],
                                       tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                       temperature=0, max_tokens=100)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_calls_come_in_openai_s_chunk_shape(demo):
    settings = dict(model="demo", messages=[{"role": "user", "content": "Weather in Hangzhou?"}], tools=[WEATHER],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, parallel_tool_calls=False,
                    max_tokens=100)
    whole = demo.chat.completions.create(**settings).choices[0]
    calls, reasons = {}, []
    for chunk in demo.chat.completions.create(stream=True, **settings):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_chunks_carry_every_token_s_logprobs(demo, tool_choice):
    # OpenAI's chunk shape: choices[].logprobs.content, here for every generated token, the tool-call JSON's
    # too, each once and in order: joined, the chunks' entries are the non-streamed answer's.
    settings = dict(model="demo", messages=[{"role": "user", "content": "Weather in Hangzhou?"}], tools=[WEATHER],
                    tool_choice=tool_choice, temperature=0, parallel_tool_calls=False, max_tokens=100,
                    logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    whole = demo.chat.completions.create(**settings).choices[0]
    streamed, ids = [], []
    for chunk in demo.chat.completions.create(stream=True, **settings):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
            ids += (choice.model_extra or {}).get("token_ids") or []
    expected = whole.logprobs.content
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, [t.token for t in e.top_logprobs]) for e in expected]
    # Equal up to float noise: the second request reuses the first one's cached prefix.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert ids == whole.model_extra["token_ids"] and len(ids) == len(expected) > 0
    # A call, and (auto) the plain-answer branch the demo checkpoint takes, rambling to the limit.
    assert whole.finish_reason == {"required": "tool_calls", "auto": "length"}[tool_choice]


def test_auto_answers_plain_questions_in_text_streamed_as_it_grows(demo):
    settings = dict(model="demo", messages=[{"role": "user", "content": "Where is the capital of Zhejiang?"}],
                    tools=[WEATHER], temperature=0, max_tokens=40)
    whole = demo.chat.completions.create(**settings).choices[0]
    pieces = [c.choices[0].delta.content for c in demo.chat.completions.create(stream=True, **settings)
              if c.choices and c.choices[0].delta.content]
    # The demo checkpoint takes the plain-answer branch (and, never trained on JSON, rambles to the limit).
    assert whole.finish_reason == "length" and whole.message.tool_calls is None
    assert whole.message.content.startswith("demo checkpoint")
    assert "".join(pieces) == whole.message.content and len(pieces) > 1


def test_a_tool_result_turn_is_answered(demo):
    messages = [{"role": "user", "content": "Weather in Hangzhou?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city":"Hangzhou"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 C."}]
    out = demo.chat.completions.create(model="demo", messages=messages, tools=[WEATHER], temperature=0, max_tokens=200)
    assert out.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_tools_with_a_response_format_answer_a_call_or_json_in_the_format(tiny):
    # As OpenAI: with tool_choice "auto" the answer calls a tool or is JSON in the response format.
    settings = dict(model="tiny", messages=[{"role": "user", "content": "A city, or its weather."}], tools=[WEATHER],
                    response_format=_schema_format(SCHEMA), max_tokens=96)
    answered = []
    for seed in range(6):
        choice = tiny.chat.completions.create(temperature=1.0, seed=seed, **settings).choices[0]
        if choice.finish_reason == "tool_calls":
            assert choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        elif choice.finish_reason == "stop":
            assert choice.message.tool_calls is None
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        else:
            assert choice.finish_reason == "length"
        answered.append(choice.finish_reason)
    assert set(answered) - {"length"}, answered
    # Streamed, the same answer: its JSON as it grows, or the calls at the end.
    whole = tiny.chat.completions.create(temperature=0, **settings).choices[0]
    chunks = [c.choices[0] for c in tiny.chat.completions.create(temperature=0, stream=True, **settings) if c.choices]
    content = "".join(c.delta.content or "" for c in chunks)
    calls = [(t.function.name, t.function.arguments) for c in chunks for t in c.delta.tool_calls or []]
    assert (content or None, calls or None, chunks[-1].finish_reason) == (
        whole.message.content, [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]
        or None, whole.finish_reason)


def _error(call):
    with pytest.raises(openai.BadRequestError) as raised:
        call()
    return raised.value.body


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": _schema_format({"type": "array", "uniqueItems": True})}, "response_format", "/uniqueItems"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "not": {"required": ["a"]}}}}]},
     "tools", "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
])
def test_unsupported_formats_and_tools_are_400s_naming_them(tiny, extra, param, words):
    body = _error(lambda: tiny.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                       extra_body=extra))
    assert body["param"] == param and words in body["message"]


def test_open_webui_s_request_shape_is_answered(demo):
    """What Open WebUI's chat page sends by default: ~35 built-in tools, no tool_choice, streamed."""
    tools = [{"type": "function", "function": {
        "name": f"builtin_tool_{i}", "description": f"Built-in tool number {i}: does thing {i}.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to do."},
                                                        "count": {"type": "integer"}}, "required": ["query"]}}}
        for i in range(35)]
    messages = [{"role": "user", "content": "Where is the capital of Zhejiang?"}]
    chunks = list(demo.chat.completions.create(model="demo", messages=messages, tools=tools, stream=True,
                                               stream_options={"include_usage": True}))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # With the demo's 512-piece vocabulary the 35 tools take more than the 4096-token context: with
    # tool_choice "auto" they are left out, and the model answers as it does without tools.
    plain = demo.chat.completions.create(model="demo", messages=messages).choices[0]
    assert reasons == ["stop"] and text == plain.message.content == "The capital of Zhejiang Province is Hangzhou."
    assert chunks[-1].usage.prompt_tokens < 100


# -- the Responses API ---------------------------------------------------------------

RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}


def test_responses_function_calls_and_their_outputs(demo):
    first = demo.responses.create(model="demo", input="Weather in Hangzhou?", tools=[RESPONSES_WEATHER],
                                  tool_choice="required", parallel_tool_calls=False, temperature=0,
                                  max_output_tokens=100)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    # The call and its output go back as input items; previous_response_id carries the same turn.
    items = [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 25 C."}]
    explicit = demo.responses.create(model="demo", input=[{"role": "user", "content": "Weather in Hangzhou?"},
                                                          *items], tools=[RESPONSES_WEATHER], tool_choice="none",
                                     temperature=0, max_output_tokens=30, store=False)
    chained = demo.responses.create(model="demo", previous_response_id=first.id, input=items[1:],
                                    tools=[RESPONSES_WEATHER], tool_choice="none", temperature=0,
                                    max_output_tokens=30)
    assert explicit.output_text and explicit.output_text == chained.output_text
    assert explicit.usage.input_tokens == chained.usage.input_tokens


def test_responses_stream_function_calls_as_items(demo):
    events = list(demo.responses.create(model="demo", input="Weather in Hangzhou?", tools=[RESPONSES_WEATHER],
                                        tool_choice={"type": "function", "name": "get_weather"},
                                        parallel_tool_calls=False, temperature=0, max_output_tokens=100,
                                        stream=True))
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    done = events[-1].response.output[0]
    assert done.type == "function_call" and events[4].arguments == done.arguments


def test_responses_text_format_json_schema(tiny):
    out = tiny.responses.create(model="tiny", input="A city, as JSON.", temperature=0, max_output_tokens=96,
                                text={"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                                                 "strict": True}})
    if out.status == "completed":
        jsonschema.validate(json.loads(out.output_text), SCHEMA)
    else:
        assert out.incomplete_details.reason == "max_output_tokens"
    assert out.text.format.type == "json_schema"
