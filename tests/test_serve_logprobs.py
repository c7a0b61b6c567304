"""Logprobs, echo scoring and vLLM's sampling extensions over real HTTP, with the real ``openai`` SDK.

The numbers are checked against a plain forward of the same checkpoint with
``torch.log_softmax`` in the test; the server runs the default engine
(continuous batching, whose fallback serves these requests).
"""

import openai
import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

TOL = 1e-4
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(build_app(tiny_dir, "tiny")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo():
    with running_server(build_app(DEMO_DIR, "demo")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=f"{tiny_dir}/tokenizer.model")


def reference(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def token_text(sp, token_id):
    if sp.is_byte(token_id):
        return bytes([int(sp.id_to_piece(token_id)[3:-1], 16)]).decode("utf-8", errors="backslashreplace")
    return sp.id_to_piece(token_id).replace("\u2581", " ")


def chat(client, stream=False, **settings):
    settings = {"model": "tiny", "messages": [{"role": "user", "content": "Where is West Lake?"}], "max_tokens": 12,
                "extra_body": {"return_token_ids": True}, **settings}
    if not stream:
        response = client.chat.completions.create(**settings)
        return response.prompt_token_ids, response.choices[0].token_ids, response.choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **settings))
    ids = [t for c in chunks for choice in c.choices for t in (getattr(choice, "token_ids", None) or [])]
    content = [item for c in chunks for choice in c.choices if choice.logprobs for item in choice.logprobs.content]
    return chunks[0].prompt_token_ids, ids, content


def test_chat_logprobs_equal_a_plain_forward(server, model, sp):
    prompt_ids, ids, content = chat(server, logprobs=True, top_logprobs=3, **GREEDY)
    ref = reference(model, prompt_ids + ids)
    assert len(content) == len(ids) == 12
    for i, (token_id, item) in enumerate(zip(ids, content)):
        row = ref[len(prompt_ids) - 1 + i]
        assert item.token == token_text(sp, token_id)
        assert item.logprob == pytest.approx(row[token_id].item(), abs=TOL)
        top = torch.topk(row, 3)
        assert [t.token for t in item.top_logprobs] == [token_text(sp, t) for t in top.indices.tolist()]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=TOL)
        if not sp.is_byte(token_id):
            assert bytes(item.bytes).decode() == item.token


def test_chat_stream_reports_what_the_whole_answer_does(server):
    whole = chat(server, logprobs=True, top_logprobs=2, **GREEDY)
    streamed = chat(server, stream=True, logprobs=True, top_logprobs=2, **GREEDY)
    assert streamed[1] == whole[1]

    def flat(content):
        return [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content]

    def numbers(content):
        return [x for c in content for x in (c.logprob, *(t.logprob for t in c.top_logprobs))]

    assert flat(streamed[2]) == flat(whole[2])
    assert numbers(streamed[2]) == pytest.approx(numbers(whole[2]), abs=TOL)  # a reused KV cache adds float noise


def test_sampled_and_greedy_report_the_same_numbers(server, model):
    prompt_ids, greedy_ids, greedy = chat(server, logprobs=True, **GREEDY)
    _, ids, sampled = chat(server, logprobs=True, temperature=0.5, top_p=0.9, seed=3,
                           extra_body={"return_token_ids": True, "top_k": 4, "repetition_penalty": 1.2})
    ref = reference(model, prompt_ids + ids)
    assert [item.logprob for item in sampled] == pytest.approx(
        [ref[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(ids)], abs=TOL)
    shared = 0
    while shared < len(ids) and ids[shared] == greedy_ids[shared]:
        assert sampled[shared].logprob == pytest.approx(greedy[shared].logprob, abs=1e-6)
        shared += 1
    assert shared > 0


def test_echo_with_no_new_tokens_scores_a_text(server, model):
    text = "West Lake is in Hangzhou"
    response = server.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    ids = choice.prompt_token_ids
    assert choice.text == text and choice.token_ids == [] and response.usage.completion_tokens == 0
    ref = reference(model, ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                        abs=TOL)
    assert all(len(top) <= 2 and max(top.values()) >= lp for top, lp in
               zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[:2] == [0, 0]


def test_completion_logprobs_token_ids_and_stream(server, model):
    prompt = [1, 50, 60, 70, 80]  # token ids as given
    settings = dict(model="tiny", prompt=prompt, max_tokens=6, echo=True, logprobs=1, temperature=0,
                    extra_body={"return_token_ids": True})
    choice = server.completions.create(**settings).choices[0]
    logprobs = choice.logprobs
    all_ids = prompt + choice.token_ids
    ref = reference(model, all_ids)
    assert len(logprobs.token_logprobs) == len(all_ids)
    assert logprobs.token_logprobs[1:] == pytest.approx(
        [ref[i - 1, all_ids[i]].item() for i in range(1, len(all_ids))], abs=TOL)
    chunks = list(server.completions.create(stream=True, **settings))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    joined = {key: [v for part in parts for v in getattr(part, key)] for key in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    # The same numbers up to float noise (the second request reuses the first one's KV cache).
    assert (joined["tokens"], joined["text_offset"]) == (logprobs.tokens, logprobs.text_offset)
    assert joined["token_logprobs"][0] is None and joined["top_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(logprobs.token_logprobs[1:], abs=TOL)
    for got, expected in zip(joined["top_logprobs"][1:], logprobs.top_logprobs[1:]):
        assert got == pytest.approx(expected, abs=TOL)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_vllm_extensions_on_the_default_engine(demo):
    def answer(**extra):
        response = demo.completions.create(model="demo", prompt="[INST] Where is the capital of Zhejiang? [/INST]",
                                           max_tokens=40, temperature=0, extra_body=extra)
        return response.choices[0], response.usage.completion_tokens

    plain, count = answer()
    assert plain.finish_reason == "stop" and count < 40
    long, count = answer(ignore_eos=True)
    assert (long.finish_reason, count) == ("length", 40) and long.text.startswith(plain.text)
    held, count = answer(min_tokens=count - 5)
    assert count >= 35 and held.text.startswith(plain.text)
    assert answer(top_k=5, repetition_penalty=1.0)[0].text == plain.text
    assert answer(repetition_penalty=5.0)[0].text != plain.text
    penalized = demo.completions.create(model="demo", prompt="[INST] Where is the capital of Zhejiang? [/INST]",
                                        max_tokens=40, temperature=0, frequency_penalty=2, presence_penalty=2,
                                        extra_body={"ignore_eos": True})
    assert penalized.choices[0].text != long.text


@pytest.mark.parametrize("settings, param", [
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(extra_body={"top_k": -2}), "top_k"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
])
def test_bad_logprobs_settings_are_named(server, settings, param):
    with pytest.raises(openai.BadRequestError) as raised:
        server.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], **settings)
    assert raised.value.body["param"] == param
