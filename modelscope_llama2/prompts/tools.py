"""Tool calls for Llama 2 chat: the tools in Meta's prompt, the answer constrained to a generic JSON format.

Llama 2 has no native tool-call format, so this module fixes one (as
llama.cpp's generic handler does for such models), pure Python:

* **Prompt**: the tool definitions go into the system message, as text the
  model reads (:func:`system_with_tools`); the dialog is then Meta's format,
  token for token, with that system message. Earlier assistant tool calls are
  rendered as the JSON the model answers with, and ``tool`` results as a user
  turn ``{"tool_results":[{"name":..., "content":...}]}``
  (:func:`dialog_from_messages`).
* **Answer**: ``{"tool_calls":[{"name":..., "arguments":{...}}]}`` or, with
  ``tool_choice: "auto"``, also ``{"response":"..."}`` for a plain answer;
  with a ``response_format`` too (:attr:`ToolSpec.response`), the answer
  is ``{"response":<JSON in that format>}`` instead, and its content is that JSON.
  :func:`output_schema` is the JSON schema constrained decoding enforces
  (``required``/named: a call of the right tool with valid arguments;
  ``auto``: both branches); ``none`` ignores the tools altogether.
* **Parsing**: :func:`parse_tool_output` (whole answers) and
  :class:`ToolOutputStream` (streamed) turn it back into OpenAI's
  ``tool_calls`` (``id``, ``type: "function"``, ``function.name``,
  ``function.arguments`` as a JSON string) or the plain answer text.

Example:
    >>> spec = parse_tools([{"type": "function", "function": {"name": "add", "description": "Add two ints.",
    ...     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    ...                    "required": ["a", "b"]}}}], tool_choice="required")
    >>> print(system_with_tools(None, spec))
    You can call these tools (each line: a tool's name, what it does, and the JSON schema of its arguments):
    {"name":"add","description":"Add two ints.","parameters":{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"}},"required":["a","b"]}}
    <BLANKLINE>
    Answer with a JSON object {"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}.
    >>> content, calls = parse_tool_output('{"tool_calls":[{"name":"add","arguments":{"a":1,"b":2}}]}', spec)
    >>> content, calls[0].name, calls[0].arguments
    (None, 'add', '{"a":1,"b":2}')
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

from .chat_format import Dialog
from .prompt import StructuredOutput
from .structured import check_json_schema

ToolMode = Literal["none", "auto", "required", "named"]
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_TOOLS_HEADER = ("You can call these tools (each line: a tool's name, what it does, and the JSON schema of its "
                 "arguments):")
_CALL_FORMAT = '{"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}'
_ONE_CALL = " Call one tool at a time."
# Calls in one answer, at most: a small model that keeps adding calls still ends.
MAX_PARALLEL_TOOL_CALLS = 4


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: Dict[str, Any]


@dataclass(frozen=True)
class ToolSpec:
    """The tools of a request and how they may be used.

    ``mode``: ``"none"`` (tools ignored), ``"auto"`` (a tool call or a plain
    answer), ``"required"`` (some tool call) or ``"named"`` (a call of
    ``name``); ``parallel``: several calls in one answer.
    """

    tools: Tuple[Tool, ...]
    mode: ToolMode = "auto"
    name: Optional[str] = None
    parallel: bool = True
    # The request's response_format: the format of an answer that calls no tool (None: plain text).
    response: Optional[StructuredOutput] = None

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)


@dataclass(frozen=True)
class ToolCall:
    """One call in OpenAI's shape: ``arguments`` is a JSON string."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> Dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- parsing a request's tools -----------------------------------------------


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None,
                where: str = "") -> Optional[ToolSpec]:
    """OpenAI's ``tools``/``tool_choice``/``parallel_tool_calls`` as a :class:`ToolSpec` (``None`` without tools).

    Errors (``ValueError``/``TypeError``) name the field, prefixed by ``where``.

    Example:
        >>> parse_tools([{"type": "function", "function": {"name": "f"}}], {"type": "function",
        ...             "function": {"name": "f"}}).mode
        'named'
        >>> parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}])
        Traceback (most recent call last):
        ...
        ValueError: tools[0].function.parameters: JSON-schema keyword(s) not supported for constrained decoding: /not
    """
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"{where}tool_choice: {tool_choice!r} needs tools")
        return None
    if not isinstance(tools, (list, tuple)):
        raise TypeError(f"{where}tools: expected a list of {{'type': 'function', 'function': {{...}}}}")
    parsed = tuple(_parse_tool(tool, f"{where}tools[{i}]") for i, tool in enumerate(tools))
    names = [tool.name for tool in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}tools: tool names must be unique, got {names}")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise TypeError(f"{where}parallel_tool_calls: expected a bool")
    mode, name = _parse_choice(tool_choice, names, where)
    return ToolSpec(parsed, mode, name, parallel_tool_calls is not False)


def _parse_tool(tool: Any, where: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise TypeError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'description', "
                        f"'parameters'}}}}, got {tool!r}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ValueError(f"{where}.function.name: expected 1 to 64 letters, digits, '_', '.' or '-', got {name!r}")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise TypeError(f"{where}.function.description: expected a string")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    check_json_schema(parameters, f"{where}.function.parameters")
    return Tool(name, description, parameters)


def _parse_choice(choice: Any, names: List[str], where: str) -> Tuple[ToolMode, Optional[str]]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ValueError(f"{where}tool_choice: no tool named {name!r} in tools ({names})")
        return "named", name
    raise ValueError(f"{where}tool_choice: expected 'none', 'auto', 'required' or "
                     f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")


# -- the prompt ----------------------------------------------------------------


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def tools_text(spec: ToolSpec) -> str:
    """The tool definitions and the answer format, as the model reads them (one tool per line)."""
    lines = [_TOOLS_HEADER]
    lines += [_compact({"name": tool.name, "description": tool.description, "parameters": tool.parameters})
              for tool in spec.tools]
    if spec.mode == "auto":
        answer = "your answer as a string" if spec.response is None else "your answer, as JSON in the format asked"
        instruction = (f"To call tools, answer with a JSON object {_CALL_FORMAT}; otherwise answer with "
                       f'{{"response":<{answer}>}}.')
    elif spec.mode == "named":
        instruction = f'Answer with a JSON object {_CALL_FORMAT.replace("<tool name>", _compact(spec.name))}.'
    else:
        instruction = f"Answer with a JSON object {_CALL_FORMAT}."
    return "\n".join(lines) + "\n\n" + instruction + ("" if spec.parallel else _ONE_CALL)


def system_with_tools(system: Optional[str], spec: Optional[ToolSpec]) -> Optional[str]:
    """The system message with the tools appended (after a blank line); unchanged when tools are inactive."""
    if spec is None or not spec.active:
        return system
    return f"{system}\n\n{tools_text(spec)}" if system else tools_text(spec)


def dialog_from_messages(messages: Sequence[Any], where: str = "messages") -> Dialog:
    """OpenAI messages (assistant ``tool_calls``, ``tool`` results) as a plain Meta dialog of role/content turns.

    An assistant turn with ``tool_calls`` becomes the JSON the model answers
    with; consecutive ``tool`` messages become one user turn of
    ``{"tool_results":[...]}`` (a user message right after them joins that
    turn, after a blank line). Other messages pass through unchanged.

    Example:
        >>> dialog_from_messages([{"role": "user", "content": "1+2?"},
        ...     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
        ...      "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        ...     {"role": "tool", "tool_call_id": "c1", "content": "3"}])[1:]
        [{'role': 'assistant', 'content': '{"tool_calls":[{"name":"add","arguments":{"a":1,"b":2}}]}'}, {'role': 'user', 'content': '{"tool_results":[{"name":"add","content":"3"}]}'}]
    """
    dialog: Dialog = []
    names: Dict[str, str] = {}  # tool_call_id -> tool name, for the results
    results: List[Dict[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            content = message.get("content")
            if not isinstance(content, str):
                raise TypeError(f"{where}[{i}]['content']: expected a string")
            name = names.get(message.get("tool_call_id"), "")
            results.append({"name": name, "content": content})
            continue
        if results:
            dialog.append({"role": "user", "content": _compact({"tool_results": results})})
            results = []
            if role == "user":  # joins the results' user turn
                dialog[-1]["content"] += "\n\n" + message["content"]
                continue
        if role == "assistant" and message.get("tool_calls"):
            calls = [_rendered_call(call, f"{where}[{i}]['tool_calls'][{j}]", names)
                     for j, call in enumerate(message["tool_calls"])]
            dialog.append({"role": "assistant", "content": _compact({"tool_calls": calls})})
            continue
        dialog.append({"role": role, "content": message.get("content") or ""})
    if results:
        dialog.append({"role": "user", "content": _compact({"tool_results": results})})
    return dialog


def _rendered_call(call: Any, where: str, names: Dict[str, str]) -> Dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TypeError(f"{where}: expected {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        raise ValueError(f"{where}['function']['arguments']: expected a JSON string") from None
    names[call.get("id")] = function["name"]
    return {"name": function["name"], "arguments": arguments}


# -- the answer ------------------------------------------------------------------


def output_schema(spec: ToolSpec) -> Dict[str, Any]:
    """The JSON schema of an answer under ``spec`` (active tools only).

    Example:
        >>> spec = ToolSpec((Tool("f", "", {"type": "object"}),), mode="auto", parallel=False)
        >>> output_schema(spec)["anyOf"][1]
        {'type': 'object', 'properties': {'response': {'type': 'string'}}, 'required': ['response']}
    """
    tools = [tool for tool in spec.tools if spec.mode != "named" or tool.name == spec.name]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                       "required": ["name", "arguments"]} for tool in tools]}
    calls = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_TOOL_CALLS if spec.parallel else 1}
    tool_calls = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    if spec.mode != "auto":
        return tool_calls
    answer, definitions = _response_schema(spec.response)
    response = {"type": "object", "properties": {"response": answer}, "required": ["response"]}
    return {"anyOf": [tool_calls, response], **definitions}


def _response_schema(response: Optional[StructuredOutput]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The schema of the answer's ``response`` value, and the definitions it refers to, for the root.

    A response format's ``$defs``/``definitions`` move to the root of the
    whole schema, where its ``#/$defs/...`` references still point.
    """
    if response is None:
        return {"type": "string"}, {}
    if response.kind == "json_object":
        return {"type": "object"}, {}
    schema = json.loads(response.spec)
    if not isinstance(schema, dict):  # true / false
        return schema, {}
    definitions = {key: schema[key] for key in ("$defs", "definitions") if key in schema}
    return {key: value for key, value in schema.items() if key not in definitions}, definitions


def structured_output(spec: Optional[ToolSpec]) -> Optional[StructuredOutput]:
    """What constrained decoding enforces for ``spec`` (``None`` when the tools are inactive)."""
    if spec is None or not spec.active:
        return None
    return StructuredOutput("json_schema", json.dumps(output_schema(spec), ensure_ascii=False))


_RESPONSE_START = '{"response":"'
_FORMATTED_START = '{"response":'


def parse_tool_output(text: str, spec: ToolSpec) -> Tuple[Optional[str], Tuple[ToolCall, ...]]:
    """``(content, tool_calls)`` of an answer in the tool format.

    A plain answer (``{"response": ...}``) gives its text and no calls; a
    tool-call answer gives ``None`` and the calls (new ids). An answer cut by
    the token limit gives what it holds as text: the plain answer so far, or
    the tool-call JSON as generated.
    """
    formatted = spec.response is not None and spec.mode == "auto" and text.startswith(_FORMATTED_START)
    try:
        value = json.loads(text)
    except ValueError:
        if formatted:  # cut by the token limit: the JSON so far
            return text[len(_FORMATTED_START):], ()
        return (_decoded_prefix(text[len(_RESPONSE_START):]) if text.startswith(_RESPONSE_START) else text), ()
    if formatted and isinstance(value, dict) and list(value) == ["response"]:
        return text[len(_FORMATTED_START):-1], ()  # the JSON exactly as generated (compact, by the grammar)
    if isinstance(value, dict) and isinstance(value.get("response"), str) and len(value) == 1:
        return value["response"].lstrip(), ()
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        calls = tuple(ToolCall(new_tool_call_id(), call["name"], _compact(call.get("arguments", {})))
                      for call in value["tool_calls"] if isinstance(call, dict) and "name" in call)
        if calls:
            return None, calls
    return text, ()




class ToolOutputStream:
    """Streams an answer in the tool format: the plain answer's text as it grows, the calls at the end.

    :meth:`feed` takes the generated text piece by piece and returns the new
    plain-answer text to show (``""`` while undecided or inside a tool call);
    :meth:`finish` returns ``(remaining content, tool_calls)``.

    Example:
        >>> stream = ToolOutputStream(ToolSpec((Tool("f", "", {}),)))
        >>> [stream.feed(piece) for piece in ['{"resp', 'onse":"Hel', 'lo \\\\', 'u00e9!"}']]
        ['', 'Hel', 'lo ', 'é!']
        >>> stream.finish()
        ('', ())
    """

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self.text = ""
        self.shown = ""

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.spec.response is not None and self.spec.mode == "auto":
            # The JSON answer as generated, but its last character, which may close the wrapper.
            decoded = self.text[len(_FORMATTED_START):-1] if self.text.startswith(_FORMATTED_START) else ""
            new, self.shown = decoded[len(self.shown):], decoded
            return new
        if not self.text.startswith(_RESPONSE_START):
            return ""
        decoded = _decoded_prefix(self.text[len(_RESPONSE_START):])
        new, self.shown = decoded[len(self.shown):], decoded
        return new

    def finish(self) -> Tuple[str, Tuple[ToolCall, ...]]:
        content, calls = parse_tool_output(self.text, self.spec)
        return (content or "")[len(self.shown):], calls


def _decoded_prefix(body: str) -> str:
    """The text of the longest complete part of a JSON string's body (no closing quote needed)."""
    end, i = len(body), 0
    while i < len(body):  # find the closing quote, if generated
        if body[i] == "\\":
            i += 2
            continue
        if body[i] == '"':
            end = i
            break
        i += 1
    body = body[:end]
    escape = body.rfind("\\")
    # Hold back an escape not yet complete ("\" or "\u00").
    if escape >= 0 and (escape == len(body) - 1 or (body[escape + 1] == "u" and len(body) - escape < 6)):
        backslashes = len(body[:escape + 1]) - len(body[:escape + 1].rstrip("\\"))
        if backslashes % 2 == 1:
            body = body[:escape]
    try:
        text = json.loads(f'"{body}"')
    except ValueError:
        return ""
    if text and "\ud800" <= text[-1] <= "\udbff":  # half a surrogate pair: wait for the other half
        text = text[:-1]
    return text.lstrip()  # Llama starts an answer with a space, as in plain chat (answer_text strips it)
