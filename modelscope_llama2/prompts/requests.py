"""Validation of the input dicts that ``chat()`` and ``complete()`` take.

Everything a caller can get wrong is caught here, before any tokenization or
model work, with a ``TypeError``/``ValueError`` that names the field. Parsing
copies what it keeps, so the caller's dict and history are never touched.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from transformers import GenerationConfig

from .chat_format import Dialog, Message, check_dialog, dialog_from_history

# Keys of the input dict that are ours; every other key must be a
# transformers generation setting (max_new_tokens, temperature, top_p, ...).
CHAT_KEYS = {"text", "system", "history", "messages", "allow_special_tags"}
COMPLETION_KEYS = {"text", "echo"}
SPEC_KEYS = {"max_length", "max_new_tokens", "stop", "seed"}
_INT_KEYS = {"max_length": 1, "max_new_tokens": 1, "min_new_tokens": 0, "top_k": 0, "seed": 0}
_GENERATION_DEFAULTS = GenerationConfig()
# Settings that would change what generate() returns or how, which the chat
# bookkeeping (one sequence per prompt, a KV cache we own) relies on.
_RESERVED = {"num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
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


@dataclass(frozen=True)
class ChatRequest:
    dialog: Dialog
    history: Tuple[Tuple[str, str], ...]
    spec: GenerationSpec


@dataclass(frozen=True)
class CompletionRequest:
    text: str
    echo: bool
    spec: GenerationSpec


def parse_chat_inputs(inputs: Any, where: str = "inputs") -> ChatRequest:
    """Validate a ``chat()`` input dict.

    Example:
        >>> request = parse_chat_inputs({"text": "Hi", "history": [("a", "b")], "max_new_tokens": 8})
        >>> [m["role"] for m in request.dialog], request.spec.max_new_tokens
        (['user', 'assistant', 'user'], 8)
    """
    _require_dict(inputs, where)
    if "messages" in inputs:
        if {"text", "history", "system"} & set(inputs):
            raise ValueError(f"{where}: give either 'messages' or 'text'/'history'/'system', not both")
        dialog = [dict(message) for message in _require_list(inputs["messages"], f"{where}['messages']")]
        check_dialog(dialog, allow_special_tags=_bool(inputs, "allow_special_tags", where))
        return ChatRequest(dialog, _history_of(dialog), _parse_spec(inputs, CHAT_KEYS, where))
    text = _require_text(inputs, where)
    system = inputs.get("system")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"{where}['system']: expected a string or None, got {type(system).__name__}")
    history = _parse_history(inputs.get("history"), f"{where}['history']")
    dialog = dialog_from_history(text, history, system)
    check_dialog(dialog, allow_special_tags=_bool(inputs, "allow_special_tags", where))
    return ChatRequest(dialog, history, _parse_spec(inputs, CHAT_KEYS, where))


def parse_completion_inputs(inputs: Any, where: str = "inputs") -> CompletionRequest:
    """Validate a ``complete()`` input dict: ``text``, ``echo`` and generation settings."""
    _require_dict(inputs, where)
    return CompletionRequest(
        _require_text(inputs, where), _bool(inputs, "echo", where), _parse_spec(inputs, COMPLETION_KEYS, where)
    )


def parse_batch(inputs: Any, parse) -> list:
    """Parse a list of input dicts; all must share their generation settings."""
    if not inputs:
        raise ValueError("inputs: expected a non-empty list of input dicts")
    requests = [parse(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
    check_same_settings([request.spec for request in requests])
    return requests


def check_same_settings(specs: List[GenerationSpec]) -> None:
    """A batch runs as one ``generate()`` call: only the token limits may differ."""
    first = specs[0]
    for i, spec in enumerate(specs[1:], start=1):
        if (spec.stop, spec.seed, spec.generate_kwargs) != (first.stop, first.seed, first.generate_kwargs):
            raise ValueError(
                f"inputs[{i}]: a batch runs as one generate() call, so its generation settings "
                "(stop, seed, sampling options) must equal those of inputs[0]"
            )


def _parse_spec(inputs: Mapping[str, Any], own_keys: set, where: str) -> GenerationSpec:
    generate_kwargs = {}
    for key, value in inputs.items():
        if key in own_keys or key in SPEC_KEYS:
            continue
        if not isinstance(key, str) or not hasattr(_GENERATION_DEFAULTS, key) or key in _RESERVED:
            raise ValueError(
                f"{where}[{key!r}]: unknown input; expected one of {sorted(own_keys | SPEC_KEYS)} "
                "or a transformers generation setting (max_new_tokens, do_sample, temperature, top_p, "
                "top_k, repetition_penalty, min_new_tokens, ...)"
            )
        generate_kwargs[key] = value
    for key, minimum in _INT_KEYS.items():
        value = inputs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            kind = "positive" if minimum else "non-negative"
            raise ValueError(f"{where}[{key!r}]: expected a {kind} int, got {value!r}")
    for key in ("temperature", "top_p", "repetition_penalty"):
        value = inputs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}[{key!r}]: expected a positive number, got {value!r}")
    if "do_sample" in inputs and not isinstance(inputs["do_sample"], bool):
        raise TypeError(f"{where}['do_sample']: expected a bool, got {type(inputs['do_sample']).__name__}")
    return GenerationSpec(
        max_length=inputs.get("max_length"),
        max_new_tokens=inputs.get("max_new_tokens"),
        stop=_parse_stop(inputs.get("stop"), f"{where}['stop']"),
        seed=inputs.get("seed"),
        generate_kwargs=generate_kwargs,
    )


def _parse_stop(stop: Any, where: str) -> Tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise TypeError(f"{where}: expected a non-empty string or a list of non-empty strings, got {stop!r}")
    return tuple(stops)


def _parse_history(history: Any, where: str) -> Tuple[Tuple[str, str], ...]:
    if history is None:
        return ()
    pairs = _require_list(history, where)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"{where}[{i}]: expected a (user, assistant) pair of two strings, got {pair!r}")
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
    return inputs["text"]


def _bool(inputs: Mapping[str, Any], key: str, where: str) -> bool:
    value = inputs.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"{where}[{key!r}]: expected a bool, got {type(value).__name__}")
    return value
