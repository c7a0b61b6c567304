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
``response.completed`` (or ``response.incomplete``; a failure once the stream started: ``response.failed``).

Example:
    >>> store = ResponseStore(max_entries=1)
    >>> store.put(StoredResponse(ResponseObject(id="resp_a", status="completed", model="m"), ()))
    >>> store.put(StoredResponse(ResponseObject(id="resp_b", status="completed", model="m"), ()))
    >>> store.get("resp_a") is None, store.get("resp_b").response.id
    (True, 'resp_b')
"""

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import Request

from ...prompts.chat_format import AnswerStream, answer_text
from ...prompts.prompt import Prompt
from ...prompts.tools import ToolCall, parse_tool_output
from ..errors import APIError
from ..generation import Choice, collect, usage
from ..protocol import (ErrorResponse, FunctionCallItem, FunctionCallOutput, FunctionCallOutputItem,
                        IncompleteDetails, InputMessage, OutputMessage, OutputText, ResponseError, ResponseObject,
                        ResponsesRequest, ResponseUsage, TextConfig, UsageInfo)
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


def conversation_of(items: List[Any]) -> List[Dict[str, Any]]:
    """Input items as chat turns: messages as they are, consecutive ``function_call`` items as one assistant
    turn with ``tool_calls``, ``function_call_output`` items as ``tool`` messages (prompts/tools.py renders both).
    """
    turns: List[Dict[str, Any]] = []
    for index, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if turns and turns[-1].get("tool_calls"):
                turns[-1]["tool_calls"].append(call)
            else:
                turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            turns += dialog_of([item], "input", first_index=index)
    return turns


def structured_fields(body: ResponsesRequest) -> Dict[str, Any]:
    """``text.format`` and the function tools in chat's shape (``response_format``, ``tools``, ...)."""
    fields: Dict[str, Any] = {}
    if body.text is not None and body.text.format.response_format() is not None:
        fields["response_format"] = body.text.format.response_format()
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise APIError(400, f"tools[{i}].type: only function tools are supported, not {tool.get('type')!r}",
                               param=f"tools[{i}].type")
            tools.append({"type": "function", "function": {key: tool[key] for key in ("name", "description",
                                                                                       "parameters") if key in tool}})
        fields["tools"] = tools
        choice = body.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            choice = {"type": "function", "function": {"name": choice["name"]}}  # flat in the Responses API
        if choice is not None:
            fields["tool_choice"] = choice
        if body.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = body.parallel_tool_calls
    return fields


def output_items(item_id: str, text: str, status: str, calls: Tuple[ToolCall, ...] = ()) -> List[Any]:
    """A response's output as items: one assistant message holding the answer's text, or its function calls.

    The one place generated text becomes output items.
    """
    if calls:
        return [FunctionCallOutput(id=f"fc_{call.id[len('call_'):]}", call_id=call.id, name=call.name,
                                   arguments=call.arguments) for call in calls]
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
        system = ({"role": "system", "content": body.instructions},) if body.instructions else ()

        def build() -> Tuple[Dialog, List[Prompt]]:  # off the event loop: a huge input takes a while to read and fit
            conversation = (*earlier, *conversation_of(input_messages(body)))
            return conversation, self.builder.chat(body, [*system, *conversation], body.max_output_tokens,
                                                   truncate=body.truncation == "auto",
                                                   max_tokens_param="max_output_tokens",
                                                   structured=structured_fields(body))

        conversation, prompts = await asyncio.to_thread(build)
        response_id, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        deltas = self.generation.run(prompts, whole=not body.stream)
        if body.stream:
            created, event = int(time.time()), _event_writer()
            # Calls are known only at the end: with tools the answer is collected, then told as the same events.
            events = self._events_at_end if prompts[0].tools is not None else self._events
            return self.streaming(events(body, prompts[0], conversation, response_id, item_id, deltas, created, event),
                                  done=False, failed=lambda error: event("response.failed", response=self._response(
                                      body, response_id, created, status="failed", error=response_error(error))))
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
        calls: Tuple[ToolCall, ...] = ()
        if prompt.tools is not None:
            content, calls = parse_tool_output(text, prompt.tools)
            text = content or ""
        complete = choice.finish_reason != "length"
        status = "completed" if complete else "incomplete"
        response = self._response(
            body, response_id, created or int(time.time()), status=status,
            incomplete_details=None if complete else IncompleteDetails(reason="max_output_tokens"),
            output=output_items(item_id, text, status, calls),
            tools=body.tools or [], tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
            parallel_tool_calls=body.parallel_tool_calls is not False and bool(body.tools),
            text=body.text or TextConfig(),
            usage=_response_usage(usage(len(prompt.token_ids), [choice.final] if choice.final else [])))
        if body.store:
            answer = {"role": "assistant", "content": text}
            if calls:
                answer["tool_calls"] = [call.as_openai() for call in calls]
            self.store.put(StoredResponse(response, (*conversation, answer)))
        return response

    async def _events(self, body: ResponsesRequest, prompt: Prompt, conversation: Dialog, response_id: str,
                      item_id: str, deltas: Deltas, created: int, event: Callable[..., str]) -> AsyncIterator[str]:
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


    async def _events_at_end(self, body: ResponsesRequest, prompt: Prompt, conversation: Dialog, response_id: str,
                             item_id: str, deltas: Deltas, created: int,
                             event: Callable[..., str]) -> AsyncIterator[str]:
        """The Responses events of an answer collected whole: each output item (message or function call)
        added, its text or arguments in one delta, done."""
        started = self._response(body, response_id, created, status="in_progress")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        choice = Choice()
        async for _, delta in deltas:
            choice.add(delta)
        finished = self._finish(body, prompt, conversation, response_id, item_id, choice, created)
        for index, item in enumerate(finished.output):
            if isinstance(item, FunctionCallOutput):
                yield event("response.output_item.added", output_index=index, item={**item.model_dump(),
                            "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                            delta=item.arguments)
                yield event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            arguments=item.arguments)
            else:
                where = {"item_id": item.id, "output_index": index, "content_index": 0}
                yield event("response.output_item.added", output_index=index,
                            item=OutputMessage(id=item.id, status="in_progress", content=[]))
                yield event("response.content_part.added", **where, part=OutputText(text=""))
                yield event("response.output_text.delta", **where, delta=item.content[0].text, logprobs=[])
                yield event("response.output_text.done", **where, text=item.content[0].text, logprobs=[])
                yield event("response.content_part.done", **where, part=item.content[0])
            yield event("response.output_item.done", output_index=index, item=item)
        yield event("response.completed" if finished.status == "completed" else "response.incomplete",
                    response=finished)


def response_error(error: ErrorResponse) -> ResponseError:
    """OpenAI's error body as a failed response's ``error``: a request the model cannot take is an
    ``invalid_prompt``; the server's own failures (engine, replica, shutdown) a ``server_error``.

    Example:
        >>> response_error(ErrorResponse.of("The server failed while generating.", "server_error"))
        ResponseError(code='server_error', message='The server failed while generating.')
    """
    code = "invalid_prompt" if error.error.type == "invalid_request_error" else "server_error"
    return ResponseError(code=code, message=error.error.message)


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _response_usage(use: UsageInfo) -> ResponseUsage:
    return ResponseUsage(input_tokens=use.prompt_tokens, input_tokens_details=use.prompt_tokens_details,
                         output_tokens=use.completion_tokens, total_tokens=use.total_tokens)


def _event_writer() -> Callable[..., str]:
    """``event(kind, **fields)``: one Responses SSE event, numbered in the order written."""
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        return sse({key: _plain(value) for key, value in payload.items()}, event=kind)

    return event
