"""prompts.requests: input dicts to a validated Prompt, the context budget, and PromptTooLong."""

import pytest

from modelscope_llama2.prompts.chat_format import PromptTooLong
from modelscope_llama2.prompts.requests import (
    chat_prompt,
    completion_prompt,
    parse_chat_inputs,
    parse_completion_inputs,
)
from tests.helpers import as_meta_dialog, meta_chat_tokens

HISTORY = [(f"question number {i}", f"answer number {i}") for i in range(20)]


def test_chat_prompt_is_metas_ids_with_the_settings(tokenizer):
    inputs = {"text": "now?", "system": "be brief", "history": [("a", "b")], "max_new_tokens": 8, "stop": "x",
              "seed": 3, "temperature": 0.5}
    prompt = chat_prompt(parse_chat_inputs(inputs), tokenizer)
    assert list(prompt.token_ids) == meta_chat_tokens(tokenizer.sp_model, as_meta_dialog("be brief", [("a", "b")],
                                                                                          "now?"))
    assert (prompt.kind, prompt.message, prompt.history, prompt.dropped_rounds) == ("chat", "now?", (("a", "b"),), 0)
    sampling = prompt.sampling
    assert (sampling.max_new_tokens, sampling.stop, sampling.seed, dict(sampling.options)) == (
        8, ("x",), 3, {"temperature": 0.5})
    assert isinstance(prompt.token_ids, tuple) and prompt.request_id
    assert chat_prompt(parse_chat_inputs(inputs), tokenizer).request_id != prompt.request_id


def test_chat_prompt_drops_the_oldest_rounds_to_fit(tokenizer):
    request = parse_chat_inputs({"text": "now?", "system": "be brief", "history": HISTORY, "max_length": 160})
    prompt = chat_prompt(request, tokenizer)
    kept = HISTORY[prompt.dropped_rounds:]
    assert 0 < prompt.dropped_rounds < len(HISTORY)
    assert list(prompt.token_ids) == meta_chat_tokens(tokenizer.sp_model, as_meta_dialog("be brief", kept, "now?"))
    # The answer may use what the prompt leaves of max_length; the caller's whole history is kept for the result.
    assert len(prompt.token_ids) <= 160 - 40 and prompt.sampling.max_new_tokens == 160 - len(prompt.token_ids)
    assert prompt.history == tuple(HISTORY)


def test_without_truncation_a_long_chat_raises_with_the_numbers(tokenizer):
    request = parse_chat_inputs({"text": "now?", "system": "be brief", "history": HISTORY, "max_length": 160})
    with pytest.raises(PromptTooLong) as raised:
        chat_prompt(request, tokenizer, truncate=False)
    full = meta_chat_tokens(tokenizer.sp_model, as_meta_dialog("be brief", HISTORY, "now?"))
    assert (raised.value.prompt_tokens, raised.value.budget) == (len(full), 120)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == (f"messages: the prompt takes {len(full)} tokens and the answer 40, more than the "
                                 "model's limit of 160 tokens")
    # A prompt that fits is the same either way.
    fits = parse_chat_inputs({"text": "now?", "history": HISTORY[:1], "max_length": 160})
    assert chat_prompt(fits, tokenizer, truncate=False).token_ids == chat_prompt(fits, tokenizer).token_ids


def test_even_the_last_turn_alone_may_not_fit(tokenizer):
    request = parse_chat_inputs({"text": "word " * 100, "max_length": 64, "max_new_tokens": 8})
    with pytest.raises(PromptTooLong, match="more than the 56 tokens") as raised:
        chat_prompt(request, tokenizer)
    assert raised.value.budget == 56 and raised.value.prompt_tokens > 56


def test_context_length_caps_max_length(tokenizer):
    request = parse_chat_inputs({"text": "hi", "max_length": 10_000})
    prompt = chat_prompt(request, tokenizer, context_length=64)
    assert len(prompt.token_ids) + prompt.sampling.max_new_tokens == 64


def test_completion_prompt_is_bos_and_text_decoding_after_it(tokenizer):
    prompt = completion_prompt(parse_completion_inputs({"text": "The capital", "echo": True}), tokenizer)
    body = tokenizer.encode("The capital")
    assert prompt.token_ids == (1, *body) and prompt.decode_prefix == tuple(body)
    assert (prompt.kind, prompt.message, prompt.echo) == ("completion", "The capital", True)


def test_a_long_completion_raises_with_the_numbers(tokenizer):
    request = parse_completion_inputs({"text": "word " * 100, "max_length": 32})
    with pytest.raises(PromptTooLong, match=r"text: the prompt takes \d+ tokens, more than the 24 tokens") as raised:
        completion_prompt(request, tokenizer)
    assert (raised.value.prompt_tokens, raised.value.budget) == (1 + len(tokenizer.encode("word " * 100)), 24)


def test_parsing_never_touches_the_callers_objects(tokenizer):
    history = [["a", "b"]]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    inputs = {"text": "c", "history": history, "stop": ["x"]}
    chat_prompt(parse_chat_inputs(inputs), tokenizer)
    chat_prompt(parse_chat_inputs({"messages": messages}), tokenizer)
    assert inputs == {"text": "c", "history": [["a", "b"]], "stop": ["x"]} and history == [["a", "b"]]
    assert messages[-1] == {"role": "user", "content": "c"} and len(messages) == 3


@pytest.mark.parametrize("inputs, field", [
    ({"text": "x\ud800y"}, "inputs['text']"),
    ({"text": "hi", "system": "\udfff"}, "inputs['system']"),
    ({"text": "hi", "history": [("ok", "a\udc00")]}, "inputs['history'][0][1]"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0]['content']"),
    ({"text": "hi", "stop": ["ok", "\ud800"]}, "inputs['stop'][1]"),
])
def test_text_that_cannot_be_encoded_is_refused_naming_the_field(inputs, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('[', '.').replace(']', '.')}: contains a lone UTF-16"):
        parse_chat_inputs(inputs)
    # A real pair of surrogates (what JSON spells an emoji with) was decoded to one character: that is fine.
    assert parse_chat_inputs({"text": "\U0001F600"}).dialog[-1]["content"] == "\U0001F600"


def test_completion_text_that_cannot_be_encoded_is_refused():
    with pytest.raises(ValueError, match=r"^inputs\['text'\]: contains a lone UTF-16 surrogate \(U\+D800\) at "
                                         "character 1"):
        parse_completion_inputs({"text": "x\ud800"})


def test_seeds_beyond_int64_are_refused():
    assert parse_chat_inputs({"text": "hi", "seed": 2**63 - 1}).spec.seed == 2**63 - 1
    with pytest.raises(ValueError, match=r"^inputs\['seed'\]: expected at most 2\*\*63 - 1, got 18446744073709551616"):
        parse_chat_inputs({"text": "hi", "seed": 2**64})


def test_temperatures_below_the_epsilon_are_greedy_as_in_vllm(tokenizer):
    from modelscope_llama2.constants import SAMPLING_EPS

    inputs = {"text": "hi", "temperature": 1e-40, "do_sample": True, "top_p": 0.9}
    prompt = chat_prompt(parse_chat_inputs(inputs), tokenizer)
    assert dict(prompt.sampling.options) == {"do_sample": False, "top_p": 0.9} and prompt.sampling.greedy
    assert inputs["temperature"] == 1e-40 and inputs["do_sample"] is True  # the caller's dict is untouched
    options = parse_chat_inputs({"text": "hi", "temperature": SAMPLING_EPS}).spec.generate_kwargs
    assert options == {"temperature": SAMPLING_EPS}
