"""Constrained decoding (response_format) on the transformers engine: every finished answer is valid.

The schema-validity property runs on the tiny random checkpoint, sampled
with several seeds, so the grammar (not the model) is what makes the JSON
valid: every answer that ends with EOS validates against its schema.
"""

import json

import jsonschema
import pytest

from modelscope_llama2.prompts.prompt import StructuredOutput

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 130}},
                   "required": ["name", "age"]}}, "required": ["person"]},
    "bounded_array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "number_range": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "count": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9}}, "required": ["score", "count"]},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, {"type": "null"}]}}, "required": ["value"]},
    "optional_keys": {"type": "object", "properties": {
        "a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 5},
        "c": {"type": "string", "maxLength": 3}}, "required": ["a"]},
    "array_root": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    "refs": {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
             "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x"]}}},
    "const_and_pattern": {"type": "object", "properties": {"kind": {"const": "point"},
                                                           "code": {"type": "string", "pattern": "^[a-c]{2}$"}},
                          "required": ["kind", "code"]},
}


def _format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_answer_ending_with_eos_validates(tiny_model, tokenizer, name):
    schema = SCHEMAS[name]
    inputs = [{"text": f"Answer as JSON, please ({seed}).", "response_format": _format(schema), "do_sample": True,
               "temperature": 1.5, "seed": seed, "max_new_tokens": 64} for seed in range(8)]
    outputs = [tiny_model.chat(item, tokenizer) for item in inputs]
    finished = [out for out in outputs if out["finish_reason"] == "eos"]
    assert len(finished) >= 3, [out["finish_reason"] for out in outputs]
    for out in finished:
        jsonschema.validate(json.loads(out["response"]), schema)
        # Compact: no whitespace outside strings.
        assert out["response"] == json.dumps(json.loads(out["response"]), separators=(",", ":"), ensure_ascii=False)


def test_json_object_answers_an_object(tiny_model, tokenizer):
    for seed in range(3):
        out = tiny_model.chat({"text": "Give me JSON.", "response_format": {"type": "json_object"}, "do_sample": True,
                               "temperature": 1.5, "seed": seed, "max_new_tokens": 64}, tokenizer)
        if out["finish_reason"] == "eos":
            assert isinstance(json.loads(out["response"]), dict)


def test_an_answer_cut_by_the_limit_is_length_not_passed_off_as_valid(tiny_model, tokenizer):
    schema = SCHEMAS["nested"]
    out = tiny_model.chat({"text": "Who?", "response_format": _format(schema), "do_sample": False,
                           "max_new_tokens": 4}, tokenizer)
    assert out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4
    with pytest.raises(ValueError):
        json.loads(out["response"])


def test_text_format_is_unconstrained(tiny_model, tokenizer):
    inputs = {"text": "Hello", "do_sample": False, "max_new_tokens": 12}
    plain = tiny_model.chat(inputs, tokenizer)
    assert tiny_model.chat({**inputs, "response_format": {"type": "text"}}, tokenizer)["response"] == plain["response"]


def test_a_batch_constrains_only_its_structured_rows(tiny_model, tokenizer):
    free = {"text": "Hello", "do_sample": False, "max_new_tokens": 32}
    constrained = {**free, "response_format": _format(SCHEMAS["enum"])}
    unconstrained = tiny_model.chat([free, free], tokenizer)
    batch = tiny_model.chat([constrained, free], tokenizer)
    assert batch[1] == unconstrained[1] and batch[0]["response"] != unconstrained[0]["response"]
    assert batch[0]["finish_reason"] == "eos"
    assert json.loads(batch[0]["response"])["color"] in ("red", "green", "blue")


@pytest.mark.parametrize("response_format, message", [
    (_format({"type": "integer", "multipleOf": 3}), "/multipleOf"),
    (_format({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}), "/properties/a/not"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "['json_schema']"),
    ({"type": "yaml"}, "['type']"),
    (_format({"type": "strin"}), 'Unsupported type "strin"'),
])
def test_bad_response_formats_are_refused_by_name_before_generating(tiny_model, tokenizer, response_format, message):
    with pytest.raises((TypeError, ValueError)) as error:
        tiny_model.chat({"text": "Hi", "response_format": response_format}, tokenizer)
    assert "response_format" in str(error.value) and message in str(error.value)


def test_grammars_compile_once_per_spec(tiny_model, tiny_dir):
    from modelscope_llama2.engines.structured import compiler_for_vocab

    compiler = compiler_for_vocab(f"{tiny_dir}/tokenizer.model", tiny_model.config.vocab_size)
    structured = StructuredOutput("json_schema", json.dumps(SCHEMAS["enum"]))
    assert compiler.compile(structured) is compiler.compile(structured)
    assert compiler_for_vocab(f"{tiny_dir}/tokenizer.model", tiny_model.config.vocab_size) is compiler


def test_the_batching_engine_gives_the_eager_engine_s_greedy_json(tiny_model, tiny_dir, tokenizer):
    from modelscope_llama2.engines.factory import load_engine

    inputs = [{"text": f"Answer as JSON ({name}).", "response_format": _format(schema), "do_sample": False,
               "max_new_tokens": 48} for name, schema in sorted(SCHEMAS.items())]
    prompts = tiny_model.prepare_chat(inputs, tokenizer)
    eager = [tiny_model.generate_prepared(prompt) for prompt in prompts]
    engine = load_engine(tiny_dir, max_batch_size=4)
    try:
        tokens = {p.request_id: [] for p in prompts}
        finish = {}
        for event in engine.generate(prompts):  # all at once: constrained rows batched together
            tokens[event.request_id] += event.token_ids
            if event.finished:
                finish[event.request_id] = event.finish_reason
    finally:
        engine.close()
    assert [tuple(tokens[p.request_id]) for p in prompts] == [g.token_ids for g in eager]
    assert [finish[p.request_id] for p in prompts] == [g.finish_reason for g in eager]
    assert sum(g.finish_reason == "eos" for g in eager) >= 5


def test_the_chat_pipeline_takes_response_format_and_tools(tiny_dir):
    from modelscope.pipelines import pipeline

    pipe = pipeline("chat", model=tiny_dir, device="cpu")
    out = pipe({"text": "JSON?", "response_format": _format(SCHEMAS["enum"]), "do_sample": False,
                "max_new_tokens": 48})
    assert out["finish_reason"] == "eos" and json.loads(out["response"])["color"] in ("red", "green", "blue")
    tools = [{"type": "function", "function": {"name": "pick", "parameters": SCHEMAS["enum"]}}]
    out = pipe({"text": "Pick.", "tools": tools, "tool_choice": "required", "parallel_tool_calls": False,
                "do_sample": False, "max_new_tokens": 64})
    assert out["finish_reason"] == "tool_calls" and out["tool_calls"][0]["function"]["name"] == "pick"
