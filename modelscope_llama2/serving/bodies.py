"""Request bodies parsed and validated off the event loop, in pieces, so no single request stalls the others.

FastAPI parses and validates a route's JSON body on the event loop, in one
C call that holds the GIL: 30,001 chat messages (a 1 MB body) took 0.1-0.4 s,
during which ``/health`` and every stream waited. Routes built with
:class:`OffLoopRoute` parse a large body in a worker thread and validate
its long lists of objects (chat ``messages``, Responses ``input`` items)
``CHUNK`` items per call, so the interpreter can switch to the event loop
between pieces; FastAPI then gets the parsed body, whose items are already
models and pass its validation by an ``isinstance`` check. A validation
error names the same field (``messages.7.role``) as FastAPI's own.

Example:
    >>> from modelscope_llama2.serving.protocol import ChatCompletionRequest
    >>> sorted(model_lists(ChatCompletionRequest))
    ['messages']
    >>> body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}] * 3}
    >>> parsed = validated_lists(body, model_lists(ChatCompletionRequest), chunk=2)
    >>> type(parsed["messages"][2]).__name__, body["messages"][2]
    ('ChatMessage', {'role': 'user', 'content': 'Hi'})
"""

import asyncio
import json
import time
from typing import Any, Callable, Dict, List, Optional, Union, get_args, get_origin

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

# Bodies up to this size are parsed on the loop as FastAPI does (a thread hop would cost more than it saves).
OFF_LOOP_BYTES = 64 * 1024
# Items validated per call: each call holds the GIL for a few milliseconds at most.
CHUNK = 256


def model_lists(model: Any) -> Dict[str, TypeAdapter]:
    """``{field: TypeAdapter(List[item])}`` for the fields of ``model`` that may hold a list of objects."""
    lists = {}
    for name, field in getattr(model, "model_fields", {}).items():
        item = _object_list_item(field.annotation)
        if item is not None:
            lists[field.alias or name] = TypeAdapter(List[item])  # type: ignore[valid-type]
    return lists


def _object_list_item(annotation: Any) -> Optional[Any]:
    """The item type of a ``List[...]`` (also inside ``Optional``/``Union``) whose items include a model."""
    if get_origin(annotation) is Union:
        return next(filter(None, map(_object_list_item, get_args(annotation))), None)
    if get_origin(annotation) is list and get_args(annotation):
        item = get_args(annotation)[0]
        members = get_args(item) if get_origin(item) is Union else (item,)
        if any(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return item
    return None


def validated_lists(body: Any, lists: Dict[str, TypeAdapter], chunk: int = CHUNK) -> Any:
    """``body`` (parsed JSON) with its long lists of objects validated ``chunk`` items at a time (a new dict).

    Raises :class:`RequestValidationError` located as FastAPI locates it (``body.messages.7.role``).
    """
    if not isinstance(body, dict):
        return body
    parsed = dict(body)
    for name, adapter in lists.items():
        items = body.get(name)
        if not isinstance(items, list) or len(items) <= chunk:
            continue
        models: List[Any] = []
        for start in range(0, len(items), chunk):
            time.sleep(0)  # hand the GIL over: the event loop may be waiting for it (else up to 5 ms each time)
            try:
                models += adapter.validate_python(items[start:start + chunk])
            except ValidationError as error:
                raise RequestValidationError([
                    {**e, "loc": ("body", name, start + e["loc"][0], *e["loc"][1:])} for e in error.errors()
                ]) from None
        parsed[name] = models
    return parsed


class ParsedRequest(Request):
    """A request whose JSON body was already parsed (FastAPI's documented custom-``Request`` seam)."""

    def __init__(self, request: Request, raw: bytes, parsed: Any):
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


class OffLoopRoute(APIRoute):
    """A route whose large JSON body is parsed and validated in a worker thread, in pieces (see the module doc)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        lists = model_lists(model)

        async def parsed_off_loop(request: Request) -> Any:
            body = await request.body()
            if len(body) <= OFF_LOOP_BYTES:
                return await handler(request)
            try:
                parsed = await asyncio.to_thread(_parse, body, lists)
            except ValueError:  # not JSON: FastAPI answers that itself
                return await handler(request)
            return await handler(ParsedRequest(request, body, parsed))

        return parsed_off_loop


def _parse(body: bytes, lists: Dict[str, TypeAdapter]) -> Any:
    return validated_lists(json.loads(body), lists)
