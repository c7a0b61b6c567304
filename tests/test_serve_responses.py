"""OpenAI's Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``), driven by the official SDK.

The prompt is the one ``/v1/chat/completions`` builds for the same messages
(token-exact, checked against ``/tokenize``); a conversation continues by
``previous_response_id`` from the server's bounded in-memory store.
"""

import httpx
import openai
import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import HANGZHOU, ONE_WORD, PLACES, SIGHTS, ZHEJIANG, running_server

KEY = "sk-responses"
AUTH = {"Authorization": f"Bearer {KEY}"}

STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def server():
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY, responses_store_size=3)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def token_count(server, messages):
    return httpx.post(f"{server}/tokenize", json={"messages": messages}, headers=AUTH).json()["count"]


def test_plain_response_is_the_chat_answer(server, client):
    response = client.responses.create(model="demo", input=ZHEJIANG, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == HANGZHOU and response.model == "demo"
    message = response.output[0]
    assert (message.type, message.role, message.status, message.content[0].type) == \
        ("message", "assistant", "completed", "output_text")
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": ZHEJIANG}],
                                          temperature=0)
    assert response.usage.input_tokens == chat.usage.prompt_tokens == \
        token_count(server, [{"role": "user", "content": ZHEJIANG}])
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_instructions_and_message_input_build_the_chat_prompt(server, client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": ZHEJIANG}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": HANGZHOU}]},
             {"type": "message", "role": "user", "content": PLACES}]
    response = client.responses.create(model="demo", instructions=ONE_WORD, input=items, temperature=0)
    messages = [{"role": "system", "content": ONE_WORD}, {"role": "user", "content": ZHEJIANG},
                {"role": "assistant", "content": HANGZHOU}, {"role": "user", "content": PLACES}]
    chat = client.chat.completions.create(model="demo", messages=messages, temperature=0)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == token_count(server, messages) and response.instructions == ONE_WORD


def test_streamed_events_in_order_and_the_response_is_stored(client):
    events = list(client.responses.create(model="demo", input=ZHEJIANG, temperature=0, stream=True))
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    # More than one delta: streamed. How many depends on how the server merges deltas while the client reads.
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == STREAM_EVENTS and len(deltas) > 1
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response
    assert "".join(deltas) == events[-4].text == completed.output_text == HANGZHOU
    assert events[0].response.status == "in_progress" and completed.status == "completed"
    assert completed.usage.output_tokens > 0
    assert client.responses.retrieve(completed.id).output_text == HANGZHOU
    client.responses.delete(completed.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(completed.id)


def test_conversation_continues_by_previous_response_id(server, client):
    first = client.responses.create(model="demo", instructions=ONE_WORD, input=ZHEJIANG, temperature=0)
    second = client.responses.create(model="demo", input=PLACES, previous_response_id=first.id, temperature=0)
    # The earlier input and answer are carried over; the earlier instructions are not (as OpenAI does).
    messages = [{"role": "user", "content": ZHEJIANG}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": PLACES}]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == token_count(server, messages)
    chat = client.chat.completions.create(model="demo", messages=messages, temperature=0)
    assert second.output_text == chat.choices[0].message.content
    streamed = list(client.responses.create(model="demo", input=PLACES, previous_response_id=first.id,
                                            temperature=0, stream=True))
    assert streamed[-1].response.output_text == second.output_text


def test_plain_conversation_continued_answers_like_chat(client):
    first = client.responses.create(model="demo", input=ZHEJIANG, temperature=0)
    second = client.responses.create(model="demo", input=PLACES, previous_response_id=first.id, temperature=0)
    assert (first.output_text, second.output_text) == (HANGZHOU, SIGHTS)


def test_store_false_unknown_ids_and_eviction(client):
    unstored = client.responses.create(model="demo", input=ZHEJIANG, temperature=0, max_output_tokens=2, store=False)
    assert unstored.status == "incomplete" and unstored.incomplete_details.reason == "max_output_tokens"
    assert unstored.usage.output_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="demo", input=PLACES, previous_response_id=unstored.id)
    assert caught.value.body["param"] == "previous_response_id"
    # The store holds 3 responses here: the 4th stored evicts the least recently used.
    ids = [client.responses.create(model="demo", input=ZHEJIANG, max_output_tokens=1).id for _ in range(3)]
    client.responses.retrieve(ids[0])  # used: now the most recent
    client.responses.create(model="demo", input=ZHEJIANG, max_output_tokens=1)
    assert client.responses.retrieve(ids[0]).id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[1])


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input.0.content.0"),
    ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "hi", "max_output_tokens": 4096}, "max_output_tokens"),
])
def test_refusals_name_the_field(server, body, param):
    response = httpx.post(f"{server}/v1/responses", json={"model": "demo", **body}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
