"""Structured outputs and tools on vLLM: the same greedy JSON as the transformers engine, token for token."""

import json

import jsonschema
import pytest

pytest.importorskip("vllm")
pytest.importorskip("xgrammar")

from tests.test_structured import SCHEMAS, _format  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def eager(vllm_model_dir):
    import modelscope_llama2  # noqa: F401
    from modelscope import Model

    return Model.from_pretrained(vllm_model_dir, device="cpu")


def _inputs():
    formats = [{"response_format": _format(schema)} for _, schema in sorted(SCHEMAS.items())]
    formats += [{"response_format": {"type": "json_object"}},
                {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}]
    return [{"text": "Where is the capital of Zhejiang?", "do_sample": False, "max_new_tokens": 48, **f}
            for f in formats]


def test_vllm_gives_the_transformers_engine_s_greedy_json(vllm_chat_pipe, eager):
    from modelscope_llama2 import Llama2Tokenizer

    tokenizer = Llama2Tokenizer.from_pretrained(eager.model_dir)
    vllm_model = vllm_chat_pipe.model
    for inputs in _inputs():
        expected = eager.generate_prepared(eager.prepare_chat(inputs, tokenizer))
        got = vllm_model.generate_prepared(vllm_model.prepare_chat(inputs, tokenizer))
        assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason), inputs
    out = vllm_model.chat({**_inputs()[-1], "max_new_tokens": 120}, tokenizer)
    assert out["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(out["tool_calls"][0]["function"]["arguments"]), WEATHER["function"]["parameters"])


def test_vllm_refuses_unsupported_schemas_by_name(vllm_chat_pipe, eager):
    from modelscope_llama2 import Llama2Tokenizer

    tokenizer = Llama2Tokenizer.from_pretrained(eager.model_dir)
    with pytest.raises(ValueError, match="/uniqueItems"):
        vllm_chat_pipe.model.chat({"text": "Hi", "response_format": _format({"type": "array", "uniqueItems": True})},
                                  tokenizer)
