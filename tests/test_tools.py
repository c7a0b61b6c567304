"""Tools in the Python API: the documented prompt rendering (token-exact Meta format) and constrained tool calls."""

import json

import jsonschema
import pytest

from modelscope_llama2.prompts.prompt import StructuredOutput
from modelscope_llama2.prompts.tools import ToolOutputStream, output_schema, parse_tool_output, parse_tools
from tests.helpers import meta_chat_tokens

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# The documented format, pinned: what the model reads in its system block.
TOOLS_SYSTEM = (
    "You can call these tools (each line: a tool's name, what it does, and the JSON schema of its arguments):\n"
    '{"name":"get_weather","description":"The weather of a city.","parameters":{"type":"object","properties":'
    '{"city":{"type":"string","maxLength":12}},"required":["city"]}}\n'
    '{"name":"get_time","description":"","parameters":{"type":"object","properties":{}}}\n\n'
    'To call tools, answer with a JSON object {"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}; '
    'otherwise answer with {"response":<your answer as a string>}.'
)


def test_tools_go_into_meta_s_system_block(tiny_model, tokenizer):
    prompt = tiny_model.prepare_chat({"text": "Weather in Paris?", "system": "Be brief.", "tools": [WEATHER, TIME]},
                                     tokenizer)
    expected = meta_chat_tokens(tokenizer.sp_model, [{"role": "system", "content": "Be brief.\n\n" + TOOLS_SYSTEM},
                                                     {"role": "user", "content": "Weather in Paris?"}])
    assert list(prompt.token_ids) == expected


def test_tool_calls_and_results_render_as_turns(tiny_model, tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    prompt = tiny_model.prepare_chat({"messages": messages, "tools": [WEATHER, TIME]}, tokenizer)
    expected = meta_chat_tokens(tokenizer.sp_model, [
        {"role": "system", "content": TOOLS_SYSTEM},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},'
                                         '{"name":"get_time","arguments":{}}]}'},
        {"role": "user", "content": '{"tool_results":[{"name":"get_weather","content":"sunny"},'
                                    '{"name":"get_time","content":"noon"}]}'},
    ])
    assert list(prompt.token_ids) == expected


def test_tool_choice_none_ignores_the_tools(tiny_model, tokenizer):
    plain = tiny_model.prepare_chat({"text": "Hi"}, tokenizer)
    none = tiny_model.prepare_chat({"text": "Hi", "tools": [WEATHER], "tool_choice": "none"}, tokenizer)
    assert none.token_ids == plain.token_ids and none.sampling.structured is None and none.tools is None


@pytest.mark.parametrize("choice, parallel", [("required", True), ({"type": "function",
                                              "function": {"name": "get_weather"}}, False)])
def test_required_and_named_choices_answer_with_valid_calls(tiny_model, tokenizer, choice, parallel):
    spec = parse_tools([WEATHER, TIME], choice, parallel)
    finished = 0
    for seed in range(4):
        out = tiny_model.chat({"text": "Weather in Paris?", "tools": [WEATHER, TIME], "tool_choice": choice,
                               "parallel_tool_calls": parallel, "do_sample": True, "temperature": 1.2, "seed": seed,
                               "max_new_tokens": 120}, tokenizer)
        if out["finish_reason"] == "length":
            assert out["tool_calls"] == []
            continue
        finished += 1
        assert out["finish_reason"] == "tool_calls" and out["response"] == ""
        calls = out["tool_calls"]
        assert 1 <= len(calls) <= (4 if parallel else 1)
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            if not parallel:
                assert call["function"]["name"] == "get_weather"
        jsonschema.validate({"tool_calls": [{"name": c["function"]["name"],
                                             "arguments": json.loads(c["function"]["arguments"])} for c in calls]},
                            output_schema(spec))
    assert finished >= 2


def test_auto_lets_the_model_answer_in_plain_text(tiny_model, tokenizer):
    outs = [tiny_model.chat({"text": "Hello", "tools": [WEATHER], "do_sample": True, "temperature": 1.2, "seed": seed,
                             "max_new_tokens": 80}, tokenizer) for seed in range(8)]
    finished = [out for out in outs if out["finish_reason"] != "length"]
    assert finished
    for out in finished:
        # Either branch, and nothing else: a call, or the answer's text.
        assert (out["finish_reason"], bool(out["tool_calls"])) in {("tool_calls", True), ("eos", False)}
        if not out["tool_calls"]:
            assert out["history"][-1] == ("Hello", out["response"])


@pytest.mark.parametrize("inputs, message", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "inputs.tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "inputs.tool_choice"),
    ({"tool_choice": "required"}, "inputs.tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "patternProperties": {}}}}]},
     "inputs.tools[0].function.parameters: JSON-schema keyword(s) not supported for constrained decoding: "
     "/patternProperties"),
])
def test_bad_tools_are_refused_by_name(tiny_model, tokenizer, inputs, message):
    with pytest.raises((TypeError, ValueError)) as error:
        tiny_model.chat({"text": "Hi", **inputs}, tokenizer)
    assert message in str(error.value)


CITY = {"type": "object", "properties": {"city": {"$ref": "#/$defs/Name"}, "rank": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 9}},
        "required": ["city", "rank"], "$defs": {"Name": {"type": "string", "maxLength": 10}}}


def test_auto_with_a_response_format_answers_a_call_or_json_in_the_format(tiny_model, tokenizer):
    # OpenAI takes both: the answer calls a tool, or is JSON in the response format (its $defs kept working).
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    prompt = tiny_model.prepare_chat({"text": "A city?", "tools": [WEATHER], "response_format": response_format},
                                     tokenizer)
    assert prompt.tools.response.kind == "json_schema"
    assert json.loads(prompt.sampling.structured.spec) == {**output_schema(prompt.tools), "$defs": CITY["$defs"]}
    expected = meta_chat_tokens(tokenizer.sp_model, [
        {"role": "system", "content": TOOLS_SYSTEM.split("\n")[0] + "\n" + TOOLS_SYSTEM.split("\n")[1] + "\n\n"
         + 'To call tools, answer with a JSON object {"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}'
         '; otherwise answer with {"response":<your answer, as JSON in the format asked>}.'},
        {"role": "user", "content": "A city?"}])
    assert list(prompt.token_ids) == expected
    outs = [tiny_model.chat({"text": "A city?", "tools": [WEATHER], "response_format": response_format,
                             "do_sample": True, "temperature": 1.2, "seed": seed, "max_new_tokens": 60}, tokenizer)
            for seed in range(8)]
    finished = [out for out in outs if out["finish_reason"] != "length"]
    assert finished
    for out in finished:
        if out["tool_calls"]:
            assert out["finish_reason"] == "tool_calls"
            for call in out["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        else:
            assert out["finish_reason"] == "eos"
            jsonschema.validate(json.loads(out["response"]), CITY)
    # A response_format with tool_choice "none" is the format alone; "required" a call alone.
    alone = tiny_model.prepare_chat({"text": "A city?", "tools": [WEATHER], "tool_choice": "none",
                                     "response_format": response_format}, tokenizer)
    assert alone.tools is None and json.loads(alone.sampling.structured.spec) == CITY


def test_the_stream_of_an_answer_in_a_response_format_is_its_json():
    spec = parse_tools([WEATHER])
    spec = type(spec)(spec.tools, spec.mode, spec.name, spec.parallel,
                      response=StructuredOutput("json_schema", json.dumps(CITY)))
    stream = ToolOutputStream(spec)
    pieces = ['{"resp', 'onse":{"ci', 'ty":"Pa', 'ris","rank":1}', '}']
    # Each piece's JSON shows but its last character, which may be the wrapper's closing brace.
    assert [stream.feed(p) for p in pieces] == ["", '{"c', 'ity":"P', 'aris","rank":1', "}"]
    assert stream.finish() == ("", ())
    assert parse_tool_output("".join(pieces), spec) == ('{"city":"Paris","rank":1}', ())
    assert parse_tool_output('{"response":{"city":"Pa', spec) == ('{"city":"Pa', ())  # cut by the limit


def test_the_stream_shows_a_plain_answer_as_it_grows_and_calls_at_the_end():
    spec = parse_tools([WEATHER])
    stream = ToolOutputStream(spec)
    assert [stream.feed(p) for p in ['{"response":"a\\"', 'b\\u00', 'e9\\ud83d', '\\ude00"}']] == ['a"', "b", "é",
                                                                                                    "😀"]
    assert stream.finish() == ("", ())
    stream = ToolOutputStream(spec)
    assert stream.feed('{"tool_calls":[{"name":"get_weather","arguments":{"city":"P"}}]}') == ""
    content, calls = stream.finish()
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"P"}')]
