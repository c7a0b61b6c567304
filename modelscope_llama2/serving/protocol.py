"""The OpenAI API's request and response bodies, as pydantic models.

Only shapes live here (as in vLLM's ``entrypoints/openai/protocol.py``);
what the fields mean for generation is decided in
:mod:`modelscope_llama2.serving.handlers`. Requests refuse unknown fields,
so a setting the server would ignore is a 400 that names it rather than a
silent difference.

Example:
    >>> request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    >>> request.messages[0].content, request.max_tokens
    ('Hi', 8)
    >>> ErrorResponse.of("bad", param="n").model_dump()["error"]["param"]
    'n'
"""

import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..constants import MAX_SEED

# -- shared ---------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody

    @classmethod
    def of(cls, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> "ErrorResponse":
        return cls(error=ErrorBody(message=message, type=type, param=param, code=code))


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class _Sampling(_Request):
    """Fields chat and completions share."""

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extension: return the prompt's and each choice's token ids.
    return_token_ids: bool = False
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}: checked in prompts/structured.py.
    response_format: Optional[Dict[str, Any]] = None

    # vLLM's sampling extensions (benchmark clients send ignore_eos and min_tokens).
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    top_k: Optional[int] = Field(default=None, ge=-1)  # -1 and 0: no top-k
    repetition_penalty: Optional[float] = Field(default=None, gt=0)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat's ``logprobs``: one item per generated token."""

    content: Optional[List[ChatTokenLogprob]] = None


class CompletionLogprobs(BaseModel):
    """Completions' legacy ``logprobs``: parallel lists, ``null`` for a token nothing predicts (echo's first)."""

    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


# -- chat -----------------------------------------------------------------


# Per-message keys that carry no meaning for generation: clients send them as
# bookkeeping (Gradio's ``metadata``/``options``, a speaker ``name``, a UI's
# ``id``); accepted and ignored. Meta's format has no place for ``name``.
IGNORED_MESSAGE_KEYS = ("name", "metadata", "options", "id")


class ContentPart(BaseModel):
    """One part of a message's content. Any ``type`` parses; text is the only kind the model takes (checked
    where the request becomes a prompt, so the error names the part)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(_Request):
    role: str
    # None: an assistant turn without text (OpenAI sends it with tool calls).
    content: Union[str, List[ContentPart], None]
    name: Optional[str] = None
    metadata: Optional[Any] = None
    options: Optional[Any] = None
    id: Optional[Any] = None
    # An assistant's earlier tool calls, and a tool message's answer to one (prompts/tools.py renders both).
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    # OpenAI Responses API's option: "auto" drops the oldest rounds to fit.
    truncation: Literal["auto", "disabled"] = "disabled"
    # Function tools (checked in prompts/tools.py); the answer is constrained to a call or, with "auto", text.
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChatLogprobs] = None
    token_ids: Optional[List[int]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: Optional[List[int]] = None
    # Extension: with truncation "auto", how many of the oldest rounds were left out of the prompt.
    dropped_rounds: Optional[int] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    # [{"index", "id", "type": "function", "function": {"name", "arguments"}}], OpenAI's streamed shape.
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None
    token_ids: Optional[List[int]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[UsageInfo] = None
    prompt_token_ids: Optional[List[int]] = None
    dropped_rounds: Optional[int] = None  # in the first chunk, as in ChatCompletionResponse


# -- completions ----------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=0)  # OpenAI's default; 0 with echo scores the prompt
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[CompletionLogprobs] = None
    token_ids: Optional[List[int]] = None
    prompt_token_ids: Optional[List[int]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


# -- models ---------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "modelscope_llama2"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


# -- responses (OpenAI's Responses API) -------------------------------------


class InputMessage(_Request):
    """A message item of a Responses ``input`` list (``type`` may be left out, as the SDK allows)."""

    type: Literal["message"] = "message"
    role: str
    content: Union[str, List[ContentPart]]
    id: Optional[str] = None
    status: Optional[str] = None


class TextFormat(_Request):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``, ``strict``)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    def response_format(self) -> Optional[Dict[str, Any]]:
        """The same format in chat's ``response_format`` shape (``None`` for text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name or "output", "schema": self.schema_ or {},
                                                       "strict": self.strict}}


class TextConfig(_Request):
    """``text``: the output's format (plain text here)."""

    format: TextFormat = Field(default_factory=TextFormat)


class FunctionCallItem(_Request):
    """An earlier function call of the model, sent back in ``input``."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Request):
    """A function call's result, sent in ``input``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: Optional[str] = None
    status: Optional[str] = None


class ResponsesRequest(_Request):
    model: str
    input: Union[str, List[Union[FunctionCallItem, FunctionCallOutputItem, InputMessage]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    truncation: Literal["auto", "disabled"] = "disabled"
    text: Optional[TextConfig] = None
    metadata: Optional[Dict[str, str]] = None
    user: Optional[str] = None
    # Function tools in the Responses shape ({"type": "function", "name", "description", "parameters"}).
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: List[Any] = Field(default_factory=list)


class FunctionCallOutput(BaseModel):
    """A ``function_call`` output item: the model calls ``name`` with ``arguments`` (JSON text)."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["completed"] = "completed"


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: List[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: PromptTokensDetails
    output_tokens: int
    output_tokens_details: Dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: str


class ResponseError(BaseModel):
    """Why a response failed (``status: "failed"``), in OpenAI's shape: one of its ``code`` values and a message."""

    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: Optional[ResponseError] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    model: str
    output: List[Any] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: Optional[str] = None
    store: bool = True
    temperature: Optional[float] = None
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: Any = "none"
    tools: List[Any] = Field(default_factory=list)
    top_p: Optional[float] = None
    truncation: str = "disabled"
    usage: Optional[ResponseUsage] = None
    user: Optional[str] = None
    metadata: Dict[str, str] = Field(default_factory=dict)


# -- tokenize / detokenize (vLLM's extension routes) ------------------------


class TokenizeRequest(_Request):
    """vLLM's two forms in one: ``prompt`` (text) or ``messages`` (chat), exactly one of them."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = Field(default=None, min_length=1)
    # Prompt form only: BOS first (default), as /v1/completions encodes a text prompt.
    add_special_tokens: Optional[bool] = None
    # Chat form: Meta's format always ends with the "[/INST]" the answer follows; there is no prompt without it.
    add_generation_prompt: Literal[True] = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """``GET /tokenizer_info``: the tokenizer's ``tokenizer_config.json`` (chat template included), as vLLM answers."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
