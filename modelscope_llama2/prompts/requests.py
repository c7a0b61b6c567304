"""Requests: the input dicts of ``chat()`` and ``complete()`` validated, then turned into a :class:`Prompt`.

Everything a caller can get wrong is caught here, before any tokenization or
model work, with a ``TypeError``/``ValueError`` that names the field. Parsing
copies what it keeps, so the caller's dict and history are never touched.
:func:`chat_prompt` and :func:`completion_prompt` then apply the context
budget (dropping the oldest rounds of a chat to fit) and encode Meta's ids.

Example:
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> tok = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    >>> prompt = chat_prompt(parse_chat_inputs({"text": "Hi!", "max_new_tokens": 8}), tok)
    >>> prompt.token_ids[:1], prompt.sampling.max_new_tokens, prompt.message
    ((1,), 8, 'Hi!')
"""

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from transformers import GenerationConfig

from ..constants import CONTEXT_LENGTH, MAX_SEED, PENALTY_OPTIONS, PENALTY_RANGE, SAMPLING_EPS
from .chat_format import (Dialog, Message, PromptTooLong, check_dialog, check_text, dialog_from_history,
                          encode_dialog, fit_dialog)
from .prompt import Prompt, SamplingParams, StructuredOutput
from .structured import parse_response_format
from .tools import ToolSpec, dialog_from_messages, parse_tools, structured_output, system_with_tools

logger = logging.getLogger(__name__)

# Without max_new_tokens, the prompt may use max_length minus this much, so
# that dropping old rounds always leaves room for an answer.
RESPONSE_RESERVE = 256

# Keys of the input dict that are ours; every other key must be a
# transformers generation setting (max_new_tokens, temperature, top_p, ...).
CHAT_KEYS = {"text", "system", "history", "messages", "allow_special_tags", "tools", "tool_choice",
             "parallel_tool_calls"}
COMPLETION_KEYS = {"text", "echo"}
SPEC_KEYS = {"max_length", "max_new_tokens", "stop", "seed", "response_format"}
_INT_KEYS = {"max_length": 1, "max_new_tokens": 1, "min_new_tokens": 0, "top_k": 0, "seed": 0}
_GENERATION_DEFAULTS = GenerationConfig()
# Settings that would change what generate() returns or how, which the chat
# bookkeeping (one sequence per prompt, a KV cache we own) relies on.
RESERVED_GENERATION_KEYS = {"num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
             "output_attentions", "output_hidden_states", "use_cache", "cache_implementation", "num_beams",
             "max_length", "pad_token_id", "eos_token_id", "bos_token_id"}


@dataclass(frozen=True)
class GenerationSpec:
    """How to generate: limits, stops, seed, and the transformers settings passed through."""

    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    seed: Optional[int] = None
    generate_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Constrained decoding (response_format): the answer follows this grammar.
    structured: Optional[StructuredOutput] = None


@dataclass(frozen=True)
class ChatRequest:
    dialog: Dialog
    history: Tuple[Tuple[str, str], ...]
    spec: GenerationSpec
    tools: Optional[ToolSpec] = None


@dataclass(frozen=True)
class CompletionRequest:
    text: str
    echo: bool
    spec: GenerationSpec


def parse_chat_inputs(inputs: Any, where: str = "inputs") -> ChatRequest:
    """Validate a ``chat()`` input dict.

    ``tools`` (OpenAI's function definitions), ``tool_choice`` and
    ``parallel_tool_calls`` put the tools into the system message and
    constrain the answer to the tool-call format (:mod:`.tools`); messages
    may then hold assistant ``tool_calls`` and ``tool`` results.

    Example:
        >>> request = parse_chat_inputs({"text": "Hi", "history": [("a", "b")], "max_new_tokens": 8})
        >>> [m["role"] for m in request.dialog], request.spec.max_new_tokens
        (['user', 'assistant', 'user'], 8)
    """
    _require_dict(inputs, where)
    tools = parse_tools(inputs.get("tools"), inputs.get("tool_choice"), inputs.get("parallel_tool_calls"),
                        f"{where}.")
    spec = _parse_spec(inputs, CHAT_KEYS, where)
    if tools is not None and spec.structured is not None:
        # Both, as OpenAI takes them: the answer is a tool call or, with tool_choice "auto", JSON in the format.
        tools = replace(tools, response=spec.structured)
    if "messages" in inputs:
        if {"text", "history", "system"} & set(inputs):
            raise ValueError(f"{where}: give either 'messages' or 'text'/'history'/'system', not both")
        messages = _require_list(inputs["messages"], f"{where}['messages']")
        if any(isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages):
            dialog = dialog_from_messages(messages, f"{where}['messages']")
        else:
            dialog = [dict(message) for message in messages]
        check_dialog(dialog, allow_special_tags=_bool(inputs, "allow_special_tags", where))
        return ChatRequest(dialog, _history_of(dialog), spec, tools)
    text = _require_text(inputs, where)
    system = inputs.get("system")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"{where}['system']: expected a string or None, got {type(system).__name__}")
    if system is not None:
        check_text(system, f"{where}['system']")
    history = _parse_history(inputs.get("history"), f"{where}['history']")
    dialog = dialog_from_history(text, history, system)
    check_dialog(dialog, allow_special_tags=_bool(inputs, "allow_special_tags", where))
    return ChatRequest(dialog, history, spec, tools)


def _with_tools(dialog: Dialog, tools: Optional[ToolSpec]) -> Dialog:
    """The dialog with the tools in its system message (after the caller's own, checked, system text)."""
    if tools is None:
        return dialog
    if dialog[0]["role"] == "system":
        return [{"role": "system", "content": system_with_tools(dialog[0]["content"], tools)}, *dialog[1:]]
    return [{"role": "system", "content": system_with_tools(None, tools)}, *dialog]


def parse_completion_inputs(inputs: Any, where: str = "inputs") -> CompletionRequest:
    """Validate a ``complete()`` input dict: ``text``, ``echo`` and generation settings."""
    _require_dict(inputs, where)
    return CompletionRequest(
        _require_text(inputs, where), _bool(inputs, "echo", where), _parse_spec(inputs, COMPLETION_KEYS, where)
    )


def parse_batch(inputs: Any, parse) -> list:
    """Parse a non-empty list of input dicts."""
    if not inputs:
        raise ValueError("inputs: expected a non-empty list of input dicts")
    return [parse(item, f"inputs[{i}]") for i, item in enumerate(inputs)]


def chat_prompt(request: ChatRequest, tokenizer, context_length: int = CONTEXT_LENGTH, truncate: bool = True) -> Prompt:
    """Meta's prompt ids for ``request``, dropping the oldest rounds until prompt and answer fit.

    ``tokenizer`` is a :class:`~modelscope_llama2.tokenizer.Llama2Tokenizer`.
    With ``truncate=False`` a prompt that does not fit whole raises
    :class:`PromptTooLong` (a ``ValueError``) instead of dropping rounds.
    Tools go into the system message and constrain the answer; with
    ``tool_choice`` ``auto``, tools that do not fit the context with the
    messages are left out (a warning is logged) and the model answers in text,
    as a client that sends its tools by default expects.
    """
    tools = request.tools if request.tools is not None and request.tools.active else None
    if tools is not None:
        try:
            return _chat_prompt(request, tools, tokenizer, context_length, truncate)
        except PromptTooLong:
            if tools.mode != "auto":
                raise
            logger.warning("tools: the %d tool definitions do not fit in the context with the messages; "
                           "answering without them (tool_choice 'auto')", len(tools.tools))
    return _chat_prompt(request, None, tokenizer, context_length, truncate)


def _chat_prompt(request: ChatRequest, tools: Optional[ToolSpec], tokenizer, context_length: int,
                 truncate: bool) -> Prompt:
    dialog = _with_tools(request.dialog, tools)
    spec = replace(request.spec, structured=structured_output(tools)) if tools is not None else request.spec
    limit, reserve = _limits(spec, context_length)
    encode, bos, eos = tokenizer.sp_model.encode, tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt_ids, dropped = fit_dialog(dialog, encode, bos, eos, budget=limit - reserve)
    if dropped and not truncate:
        length = len(encode_dialog(dialog, encode, bos, eos))
        raise PromptTooLong(
            f"messages: the prompt takes {length} tokens and the answer {reserve}, more than the model's "
            f"limit of {limit} tokens", prompt_tokens=length, budget=limit - reserve)
    if dropped:
        logger.warning("history: dropped the %d oldest round(s) so the prompt (%d tokens) and the "
                       "response fit in %d tokens", dropped, len(prompt_ids), limit)
    return Prompt(
        token_ids=tuple(prompt_ids),
        sampling=_sampling(spec, limit, len(prompt_ids)),
        kind="chat",
        message=request.dialog[-1]["content"],
        history=request.history,
        dropped_rounds=dropped,
        tools=tools,
    )


def completion_prompt(request: CompletionRequest, tokenizer, context_length: int = CONTEXT_LENGTH) -> Prompt:
    """BOS + the text's ids (no chat format); the continuation decodes after the text."""
    limit, reserve = _limits(request.spec, context_length)
    body = tokenizer.encode(request.text)
    if len(body) + 1 > limit - reserve:
        raise PromptTooLong(f"text: the prompt takes {len(body) + 1} tokens, more than the {limit - reserve} "
                            "tokens it may use (max_length minus the tokens reserved for the continuation)",
                            prompt_tokens=len(body) + 1, budget=limit - reserve)
    return Prompt(
        token_ids=(tokenizer.bos_token_id, *body),
        sampling=_sampling(request.spec, limit, len(body) + 1),
        kind="completion",
        message=request.text,
        decode_prefix=tuple(body),
        echo=request.echo,
    )


def _limits(spec: "GenerationSpec", context_length: int) -> Tuple[int, int]:
    """``(total token limit, tokens kept for the response)`` for a request."""
    limit = min(spec.max_length or context_length, context_length)
    if spec.max_new_tokens is not None and spec.max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens: {spec.max_new_tokens} leaves no room for the prompt within "
            f"{limit} tokens (max_length and the model's context of {context_length})"
        )
    return limit, spec.max_new_tokens or min(RESPONSE_RESERVE, limit // 4)


def _sampling(spec: "GenerationSpec", limit: int, prompt_len: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=min(spec.max_new_tokens or limit, limit - prompt_len),
        stop=spec.stop,
        seed=spec.seed,
        options=dict(spec.generate_kwargs),
        structured=spec.structured,
    )


def _parse_spec(inputs: Mapping[str, Any], own_keys: set, where: str) -> GenerationSpec:
    generate_kwargs = {}
    for key, value in inputs.items():
        if key in own_keys or key in SPEC_KEYS:
            continue
        known = isinstance(key, str) and (hasattr(_GENERATION_DEFAULTS, key) or key in PENALTY_OPTIONS)
        if not known or key in RESERVED_GENERATION_KEYS:
            raise ValueError(
                f"{where}[{key!r}]: unknown input; expected one of {sorted(own_keys | SPEC_KEYS)} "
                "or a transformers generation setting (max_new_tokens, do_sample, temperature, top_p, "
                "top_k, repetition_penalty, min_new_tokens, ...) or OpenAI's frequency_penalty/presence_penalty"
            )
        generate_kwargs[key] = value
    for key, minimum in _INT_KEYS.items():
        value = inputs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            kind = "positive" if minimum else "non-negative"
            raise ValueError(f"{where}[{key!r}]: expected a {kind} int, got {value!r}")
    if inputs.get("seed") is not None and inputs["seed"] > MAX_SEED:
        raise ValueError(f"{where}['seed']: expected at most 2**63 - 1, got {inputs['seed']!r}")
    for key in ("temperature", "top_p", "repetition_penalty"):
        value = inputs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}[{key!r}]: expected a positive number, got {value!r}")
    low, high = PENALTY_RANGE
    for key in PENALTY_OPTIONS:
        value = inputs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not low <= value <= high):
            raise ValueError(f"{where}[{key!r}]: expected a number in [{low}, {high}], got {value!r}")
    if "do_sample" in inputs and not isinstance(inputs["do_sample"], bool):
        raise TypeError(f"{where}['do_sample']: expected a bool, got {type(inputs['do_sample']).__name__}")
    if inputs.get("temperature") is not None and inputs["temperature"] < SAMPLING_EPS:
        # Greedy, as vLLM decodes such temperatures (sampling would divide the logits into inf/nan).
        generate_kwargs.pop("temperature")
        generate_kwargs["do_sample"] = False
    return GenerationSpec(
        max_length=inputs.get("max_length"),
        max_new_tokens=inputs.get("max_new_tokens"),
        stop=_parse_stop(inputs.get("stop"), f"{where}['stop']"),
        seed=inputs.get("seed"),
        generate_kwargs=generate_kwargs,
        structured=parse_response_format(inputs.get("response_format"), f"{where}['response_format']"),
    )


def _parse_stop(stop: Any, where: str) -> Tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise TypeError(f"{where}: expected a non-empty string or a list of non-empty strings, got {stop!r}")
    for i, text in enumerate(stops):
        check_text(text, f"{where}[{i}]")
    return tuple(stops)


def _parse_history(history: Any, where: str) -> Tuple[Tuple[str, str], ...]:
    if history is None:
        return ()
    pairs = _require_list(history, where)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"{where}[{i}]: expected a (user, assistant) pair of two strings, got {pair!r}")
        for j, text in enumerate(pair):
            check_text(text, f"{where}[{i}][{j}]")
    return tuple((user, assistant) for user, assistant in pairs)


def _history_of(dialog: List[Message]) -> Tuple[Tuple[str, str], ...]:
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    return tuple((user["content"], answer["content"]) for user, answer in zip(turns[:-1:2], turns[1::2]))


def _require_dict(inputs: Any, where: str) -> None:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{where}: expected a dict like {{'text': ..., 'history': [...]}}, got {type(inputs).__name__}")


def _require_list(value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _require_text(inputs: Mapping[str, Any], where: str) -> str:
    if "text" not in inputs:
        raise ValueError(f"{where}['text']: missing; the message to answer is required")
    if not isinstance(inputs["text"], str):
        raise TypeError(f"{where}['text']: expected a string, got {type(inputs['text']).__name__}")
    check_text(inputs["text"], f"{where}['text']")
    return inputs["text"]


def _bool(inputs: Mapping[str, Any], key: str, where: str) -> bool:
    value = inputs.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"{where}[{key!r}]: expected a bool, got {type(value).__name__}")
    return value
