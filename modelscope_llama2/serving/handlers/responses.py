"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: OpenAI's Responses API over the chat prompt builder.

``input`` (a string, or a list of messages) after ``instructions`` (the
system message) becomes the same Meta-exact prompt ``/v1/chat/completions``
builds. With ``store`` (OpenAI's default) the response is kept in a
:class:`ResponseStore`, a bounded in-memory LRU; a request with
``previous_response_id`` continues that conversation (its input and
answer, not its instructions, as OpenAI does); ``DELETE /v1/responses/{id}``
forgets one. A stream is the Responses
event sequence: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``,
``response.completed``.

Example:
    >>> store = ResponseStore(max_entries=1)
    >>> store.put(StoredResponse(ResponseObject(id="resp_a", status="completed", model="m"), ()))
    >>> store.put(StoredResponse(ResponseObject(id="resp_b", status="completed", model="m"), ()))
    >>> store.get("resp_a") is None, store.get("resp_b").response.id
    (True, 'resp_b')
"""

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import Request

from ...prompts.chat_format import AnswerStream, answer_text
from ...prompts.prompt import Prompt
from ..errors import APIError
from ..generation import Choice, collect, usage
from ..protocol import (IncompleteDetails, InputMessage, OutputMessage, OutputText, ResponseObject,
                        ResponsesRequest, ResponseUsage, UsageInfo)
from .base import Deltas, Handler, dialog_of, sse

Dialog = Tuple[Dict[str, str], ...]


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and its conversation so far (input messages and answers, without instructions)."""

    response: ResponseObject
    conversation: Dialog


class ResponseStore:
    """The last ``max_entries`` stored responses, least recently used evicted first; in memory, per process.

    A continued conversation's entries share their message dicts, so an
    entry costs its own new messages plus one reference per earlier one.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: "OrderedDict[str, StoredResponse]" = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self._entries[stored.response.id] = stored
        self._entries.move_to_end(stored.response.id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

    def get(self, response_id: str) -> Optional[StoredResponse]:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored


def input_messages(body: ResponsesRequest) -> List[InputMessage]:
    """The request's ``input`` as messages: a string is one user message."""
    if isinstance(body.input, str):
        return [InputMessage(role="user", content=body.input)]
    return body.input


def output_items(item_id: str, text: str, status: str) -> List[Any]:
    """A response's output as items: one assistant message holding the answer's text.

    The one place generated text becomes output items (where function-call
    items would be split off the text).
    """
    return [OutputMessage(id=item_id, status=status, content=[OutputText(text=text)])]


class ResponsesHandler(Handler):
    """Responses: one choice, stored for ``previous_response_id`` unless ``store`` is false."""

    def __init__(self, *args: Any, store: ResponseStore):
        super().__init__(*args)
        self.store = store

    def retrieve(self, response_id: str) -> Dict[str, Any]:
        return self._stored(response_id, "response_id").response.model_dump()

    def delete(self, response_id: str) -> Dict[str, Any]:
        self._stored(response_id, "response_id")
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def create(self, body: ResponsesRequest, request: Request) -> Any:
        self.builder.check_model(body.model)
        earlier = self._stored(body.previous_response_id, "previous_response_id").conversation \
            if body.previous_response_id else ()
        conversation = (*earlier, *dialog_of(input_messages(body), "input"))
        system = ({"role": "system", "content": body.instructions},) if body.instructions else ()
        prompts = self.builder.chat(body, [*system, *conversation], body.max_output_tokens,
                                    truncate=body.truncation == "auto", max_tokens_param="max_output_tokens")
        response_id, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        deltas = self.generation.run(prompts)
        if body.stream:
            return self.streaming(self._events(body, prompts[0], conversation, response_id, item_id, deltas),
                                  done=False)
        choices = await self.until_disconnected(request, collect(deltas, 1))
        if choices is None:
            return self.client_gone()
        self.metrics.requests.labels(status="200").inc()
        return self._finish(body, prompts[0], conversation, response_id, item_id, choices[0]).model_dump()

    def _stored(self, response_id: str, param: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise APIError(404, f"Response with id '{response_id}' not found (never stored, stored with "
                                "store: false, or evicted from this server's in-memory store).", param=param,
                           code="not_found")
        return stored

    def _response(self, body: ResponsesRequest, response_id: str, created: int, **fields: Any) -> ResponseObject:
        return ResponseObject(id=response_id, created_at=created, model=body.model, instructions=body.instructions,
                              max_output_tokens=body.max_output_tokens, previous_response_id=body.previous_response_id,
                              store=body.store, temperature=body.temperature, top_p=body.top_p,
                              truncation=body.truncation, user=body.user, metadata=body.metadata or {}, **fields)

    def _finish(self, body: ResponsesRequest, prompt: Prompt, conversation: Dialog, response_id: str, item_id: str,
                choice: Choice, created: Optional[int] = None) -> ResponseObject:
        """The finished response (stored when ``store``), from its one choice."""
        text = answer_text("".join(choice.text))
        complete = choice.finish_reason != "length"
        status = "completed" if complete else "incomplete"
        response = self._response(
            body, response_id, created or int(time.time()), status=status,
            incomplete_details=None if complete else IncompleteDetails(reason="max_output_tokens"),
            output=output_items(item_id, text, status),
            usage=_response_usage(usage(len(prompt.token_ids), [choice.final] if choice.final else [])))
        if body.store:
            self.store.put(StoredResponse(response, (*conversation, {"role": "assistant", "content": text})))
        return response

    async def _events(self, body: ResponsesRequest, prompt: Prompt, conversation: Dialog, response_id: str,
                      item_id: str, deltas: Deltas) -> AsyncIterator[str]:
        created, sequence = int(time.time()), iter(range(1 << 62))

        def event(kind: str, **fields: Any) -> str:
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            return sse({key: _plain(value) for key, value in payload.items()}, event=kind)

        started = self._response(body, response_id, created, status="in_progress")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield event("response.output_item.added", output_index=0,
                    item=OutputMessage(id=item_id, status="in_progress", content=[]))
        yield event("response.content_part.added", **where, part=OutputText(text=""))
        choice, answer = Choice(), AnswerStream()
        async for _, delta in deltas:
            choice.add(delta)
            shown = answer.feed(delta.text, final=delta.finish_reason is not None)
            if shown:
                yield event("response.output_text.delta", **where, delta=shown, logprobs=[])
        finished = self._finish(body, prompt, conversation, response_id, item_id, choice, created)
        item = finished.output[0]
        yield event("response.output_text.done", **where, text=item.content[0].text, logprobs=[])
        yield event("response.content_part.done", **where, part=item.content[0])
        yield event("response.output_item.done", output_index=0, item=item)
        yield event("response.completed" if finished.status == "completed" else "response.incomplete",
                    response=finished)


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _response_usage(use: UsageInfo) -> ResponseUsage:
    return ResponseUsage(input_tokens=use.prompt_tokens, input_tokens_details=use.prompt_tokens_details,
                         output_tokens=use.completion_tokens, total_tokens=use.total_tokens)
