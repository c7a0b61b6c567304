"""The server's everyday surface, over real HTTP with the official ``openai`` SDK (and httpx for vLLM's routes).

What clients send that carries no meaning for generation (Gradio's
``metadata``/``options``, a speaker ``name``, the ``developer`` role, a
``null`` assistant content) gives the same Meta-exact prompt as without it;
two ``user`` messages in a row are one user turn, joined by a blank line;
what the model cannot read (images, audio) is a 400 naming the part; the
answer text is the one ``chat()`` returns; ``/v1/models/{id}``,
``/tokenize``, ``/detokenize``, ``/tokenizer_info`` and ``/openapi.json``
answer as vLLM's do.
"""

import httpx
import openai
import pytest
import sentencepiece as spm

from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import (HANGZHOU, PLACES, SIGHTS, ZHEJIANG, build_scripted_checkpoint, meta_chat_tokens,
                           meta_prompt, running_server)

KEY = "sk-surface"
GREEDY = {"temperature": 0}
AUTH = {"Authorization": f"Bearer {KEY}"}
SP = spm.SentencePieceProcessor(model_file=f"{DEMO_DIR}/tokenizer.model")


@pytest.fixture(scope="module")
def server():
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def prompt_ids(client, messages, **extra):
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=4,
                                           extra_body={"return_token_ids": True, **extra}, **GREEDY)
    return reply.model_extra["prompt_token_ids"]


# -- tolerance -------------------------------------------------------------------------------------


def test_gradio_bookkeeping_and_names_change_nothing(client):
    # gr.load_chat resends earlier turns with metadata/options; the SDK's docs put a name on messages.
    plain = [{"role": "user", "content": ZHEJIANG}, {"role": "assistant", "content": HANGZHOU},
             {"role": "user", "content": PLACES}]
    decorated = [{**plain[0], "metadata": None, "options": None, "name": "ann"},
                 {**plain[1], "metadata": {"title": "x"}, "options": [], "id": "m1"},
                 {**plain[2], "name": "ann"}]
    expected = meta_chat_tokens(SP, plain)
    assert prompt_ids(client, decorated) == prompt_ids(client, plain) == expected
    reply = client.chat.completions.create(model="demo", messages=decorated, **GREEDY)
    assert reply.choices[0].message.content == SIGHTS


def test_developer_is_the_system_role_and_null_assistant_content_is_empty(client):
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ZHEJIANG}]
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": ZHEJIANG}]
    assert prompt_ids(client, developer) == prompt_ids(client, system) == meta_chat_tokens(SP, system)
    with_null = [{"role": "user", "content": ZHEJIANG}, {"role": "assistant", "content": None},
                 {"role": "user", "content": PLACES}]
    empty = [with_null[0], {"role": "assistant", "content": ""}, with_null[2]]
    assert prompt_ids(client, with_null) == meta_chat_tokens(SP, empty)


def test_consecutive_user_messages_are_one_turn(client):
    # Open WebUI, after a turn that failed, sends the unanswered question again before the next one.
    resent = [{"role": "user", "content": ZHEJIANG}, {"role": "user", "content": PLACES}]
    joined = [{"role": "user", "content": f"{ZHEJIANG}\n\n{PLACES}"}]
    assert prompt_ids(client, resent) == prompt_ids(client, joined) == meta_chat_tokens(SP, joined)
    later = [{"role": "system", "content": "Be brief."}, *resent, {"role": "assistant", "content": SIGHTS},
             {"role": "user", "content": "And"}, {"role": "user", "content": "more?"}]
    assert prompt_ids(client, later) == meta_chat_tokens(SP, [later[0], *joined, later[3],
                                                              {"role": "user", "content": "And\n\nmore?"}])
    assert resent[0] == {"role": "user", "content": ZHEJIANG}  # the caller's messages are unchanged


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}])
def test_parts_the_model_cannot_read_are_named(client, part):
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}])
    error = caught.value.body
    assert error["param"] == "messages.0.content.1"
    assert error["message"] == f"messages.0.content.1: this model takes text only, not a part of type " \
                               f"'{part['type']}'"


@pytest.mark.parametrize("body, param", [
    ({"mirostat_tau": 5.0}, "mirostat_tau"),  # a top-level setting that would change generation
    ({"messages": [{"role": "user", "content": ZHEJIANG, "weight": 2}]}, "messages.0.weight"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_what_is_not_understood_stays_a_400_naming_it(server, body, param):
    request = {"model": "demo", "messages": [{"role": "user", "content": ZHEJIANG}], **body}
    response = httpx.post(f"{server}/v1/chat/completions", json=request, headers=AUTH, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_server_and_chat_return_the_same_stripped_answer(tmp_path, tiny_dir):
    # A checkpoint whose answer starts and ends with whitespace: " " then " Yes!" then a newline.
    pieces = ["<0x20>", "▁", "Y", "es", "!", "<0x0A>"]
    directory = build_scripted_checkpoint(str(tmp_path / "padded"), pieces, tiny_dir)
    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model

    tokenizer = Llama2Tokenizer.from_pretrained(directory)
    in_process = Model.from_pretrained(directory, device="cpu").chat({"text": "hi", "do_sample": False},
                                                                     tokenizer)["response"]
    with running_server(build_app(directory, "padded")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        whole = client.chat.completions.create(model="padded", messages=messages, extra_body={"return_token_ids": True},
                                               **GREEDY)
        chunks = client.chat.completions.create(model="padded", messages=messages, stream=True, **GREEDY)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    generated = tokenizer.decode(whole.choices[0].model_extra["token_ids"], skip_special_tokens=True)
    assert generated != generated.strip()  # the model's text has the whitespace the rule removes
    assert whole.choices[0].message.content == streamed == in_process == "Yes!"


# -- models, tokenize, tokenizer_info, openapi -----------------------------------------------------


def test_models_retrieve(client):
    model = client.models.retrieve("demo")
    assert (model.id, model.object, model.model_extra["max_model_len"]) == ("demo", "model", 4096)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


def test_tokenize_text_and_chat_like_the_routes_that_generate(server, client):
    text = httpx.post(f"{server}/tokenize", json={"model": "demo", "prompt": ZHEJIANG}, headers=AUTH).json()
    assert text == {"count": len(SP.encode(ZHEJIANG)) + 1, "max_model_len": 4096,
                    "tokens": [SP.bos_id(), *SP.encode(ZHEJIANG)], "token_strs": None}
    bare = httpx.post(f"{server}/tokenize", json={"prompt": ZHEJIANG, "add_special_tokens": False,
                                                  "return_token_strs": True}, headers=AUTH).json()
    assert bare["tokens"] == SP.encode(ZHEJIANG) and bare["token_strs"] == SP.encode(ZHEJIANG, out_type=str)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": ZHEJIANG},
                {"role": "assistant", "content": HANGZHOU}, {"role": "user", "content": PLACES}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": messages}, headers=AUTH).json()
    assert chat["tokens"] == prompt_ids(client, messages) == \
        meta_chat_tokens(SP, [{"role": "system", "content": "Be brief."}, *messages[1:]])
    back = httpx.post(f"{server}/detokenize", json={"tokens": text["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "<s>" + ZHEJIANG}


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "messages"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}]}, "messages"),
    ("/detokenize", {"tokens": [1, 512]}, "tokens"),
    ("/tokenize", {"model": "other", "prompt": "a"}, "model"),
])
def test_tokenize_refusals_name_the_field(server, route, body, param):
    response = httpx.post(server + route, json=body, headers=AUTH)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


def test_tokenizer_info_is_the_tokenizer_config_behind_the_key(server):
    assert httpx.get(f"{server}/tokenizer_info").status_code == 401
    info = httpx.get(f"{server}/tokenizer_info", headers=AUTH).json()
    assert info == Llama2Tokenizer.from_pretrained(DEMO_DIR).tokenizer_config()
    assert (info["bos_token"], info["eos_token"], info["tokenizer_class"]) == ("<s>", "</s>", "LlamaTokenizer")


def test_openapi_describes_what_is_accepted(server):
    assert httpx.get(f"{server}/openapi.json").status_code == 401
    document = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/{response_id}",
            "/v1/models", "/v1/models/{model_id}", "/tokenize", "/detokenize", "/tokenizer_info"} <= \
        set(document["paths"])
    schemas = document["components"]["schemas"]
    assert schemas["ChatMessage"]["additionalProperties"] is False
    assert {"role", "content", "name", "metadata", "options"} <= set(schemas["ChatMessage"]["properties"])
    assert {"input", "instructions", "previous_response_id", "store"} <= \
        set(schemas["ResponsesRequest"]["properties"])


# -- truncation: the rounds dropped ----------------------------------------------------------------


def test_dropped_rounds_are_reported_with_truncation_auto(client):
    rounds = ((ZHEJIANG, HANGZHOU), (PLACES, SIGHTS)) * 2
    messages = [m for user, answer in rounds for m in ({"role": "user", "content": user},
                                                       {"role": "assistant", "content": answer})]
    messages.append({"role": "user", "content": ZHEJIANG})
    tokens, dropped = meta_prompt(Llama2Tokenizer.from_pretrained(DEMO_DIR), None, rounds, ZHEJIANG, 4000)
    assert dropped > 0
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=4000,
                                           extra_body={"truncation": "auto"}, **GREEDY)
    assert whole.model_extra["dropped_rounds"] == dropped and whole.usage.prompt_tokens == tokens
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=4000, stream=True,
                                            extra_body={"truncation": "auto"}, **GREEDY)
    first = next(iter(stream))
    stream.close()
    assert first.model_extra["dropped_rounds"] == dropped
    short = client.chat.completions.create(model="demo", messages=messages[-1:], extra_body={"truncation": "auto"},
                                           **GREEDY)
    plain = client.chat.completions.create(model="demo", messages=messages[-1:], **GREEDY)
    assert short.model_extra["dropped_rounds"] == 0 and "dropped_rounds" not in plain.model_extra
