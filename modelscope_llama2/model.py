"""The ModelScope facade: ``chat()``, ``stream_chat()``, ``complete()`` over any engine.

:class:`ChatMethods` is the whole documented API, written once against the
engine interface: validate and encode (``prompts``), generate (an
:class:`~modelscope_llama2.engines.base.Engine`), decode (``decoding``),
shape the caller's dict. :class:`Llama2ForChat` is transformers'
``LlamaForCausalLM`` with those methods on the transformers engine (what
``Model.from_pretrained(dir)`` builds); :class:`EngineChatModel` carries them
for an engine that holds its own weights (``llm_framework='vllm'``).

Example:
    >>> import modelscope_llama2
    >>> from modelscope import Model
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> model = Model.from_pretrained(DEMO_DIR, device="cpu")
    >>> tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(DEMO_DIR)
    >>> out = model.chat({"text": "Where is the capital of Zhejiang?", "max_length": 512}, tokenizer)
    >>> out["response"], out["finish_reason"], out["usage"]["completion_tokens"] > 0
    ('The capital of Zhejiang Province is Hangzhou.', 'eos', True)
    >>> model.chat({"text": "What are the interesting places there?", "history": out["history"]}, tokenizer)["response"]
    'West Lake, Lingyin Temple and the Grand Canal are worth a visit.'
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

from typing_extensions import NotRequired

import torch
from modelscope.models.base import Model, TorchModel
from transformers import LlamaForCausalLM

from .checkpoints.save import save_checkpoint
from .constants import DEFAULT_ENGINE, ENGINES, LLM_FRAMEWORK_KEY
from .decoding import decode_stream
from .engines.base import Engine, Usage
from .engines.prefix_cache import DEFAULT_MAX_BYTES, PromptCache
from .engines.transformers_engine import TransformersEngine
from .prompts.chat_format import answer_text
from .prompts.prompt import Prompt
from .prompts.requests import (
    chat_prompt,
    completion_prompt,
    parse_batch,
    parse_chat_inputs,
    parse_completion_inputs,
)
from .prompts.tools import parse_tool_output
from .tokenizer import Llama2Tokenizer, sentencepiece_tokenizer

Inputs = Union[Dict[str, Any], Sequence[Dict[str, Any]]]


class UsageDict(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class ChatResult(TypedDict):
    """What ``chat()`` returns (and ``stream_chat()`` yields, ``finish_reason``/``usage`` ``None`` until the end)."""

    response: str
    history: List[Tuple[str, str]]
    finish_reason: Optional[str]  # 'eos', 'stop' or 'length'
    usage: Optional[UsageDict]
    dropped_rounds: int  # oldest history rounds left out of the prompt to fit the context
    # With tools: OpenAI's tool calls ({'id', 'type': 'function', 'function': {'name', 'arguments'}}),
    # empty for a plain answer; finish_reason is then 'tool_calls'.
    tool_calls: NotRequired[List[Dict[str, Any]]]


class CompletionResult(TypedDict):
    """What ``complete()`` returns."""

    text: str
    finish_reason: Optional[str]
    usage: Optional[UsageDict]


Output = Union[ChatResult, CompletionResult]


@dataclass(frozen=True)
class Generation:
    """One prompt's generated ids, their text (cut at a stop string), why it ended, and usage."""

    token_ids: Tuple[int, ...]
    text: str
    finish_reason: str
    usage: Usage


class ChatMethods:
    """``chat``/``stream_chat``/``complete``/``stream_complete`` and their steps, over :attr:`engine`.

    Prompts are encoded with the checkpoint's own ``tokenizer.model``, found
    behind whatever tokenizer is passed (see
    :func:`~modelscope_llama2.tokenizer.sentencepiece_tokenizer`); generated
    text is decoded with the same.
    """

    engine: Engine
    _text_tokenizer: Optional[Llama2Tokenizer] = None

    # -- the documented entry points -----------------------------------------

    def chat(self, inputs: Inputs, tokenizer: Any) -> Union[ChatResult, List[ChatResult]]:
        """Answer the last user message in Meta's Llama 2 chat format.

        ``inputs``: ``text`` (required) or ``messages``; ``system``, ``history``
        (list of (user, assistant) pairs), ``max_length`` (prompt + response
        tokens), ``stop``, ``seed``, ``allow_special_tags`` and generation
        settings (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ...). Sampling defaults come from the checkpoint's
        ``generation_config.json``. A list of dicts runs as one batch.
        ``response_format`` (OpenAI's ``json_object``/``json_schema``) and
        ``tools``/``tool_choice``/``parallel_tool_calls`` constrain the answer
        (constrained decoding; see README "Structured outputs and tools").

        Returns a :class:`ChatResult`: ``{'response', 'history',
        'finish_reason', 'usage', 'dropped_rounds'}`` (plus ``tool_calls``
        with tools); ``history`` is a new list ending with (text, response).

        Example:
            >>> out = model.chat({"text": "Who are you?", "system": "Be brief.", "do_sample": False}, tokenizer)
            >>> out["history"][-1][0], out["finish_reason"]
            ('Who are you?', 'eos')
        """
        prepared = self.prepare_chat(inputs, tokenizer)
        return self.decode_prepared(prepared, self.generate_prepared(prepared))

    def stream_chat(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[ChatResult]:
        """Like :meth:`chat`, yielding the result each time the visible text grows.

        Streamed text never ends in a broken multi-byte character, each item's
        response is a prefix of the next, and the last item is :meth:`chat`'s
        result (``finish_reason`` and ``usage`` are ``None`` until then). Input
        is checked on the call, before the iterator is returned.

        Example:
            >>> [out["response"] for out in model.stream_chat({"text": "Say hello in emoji."}, tokenizer)][-1]
            '👋🦙😀'
        """
        return self.stream_prepared(self.prepare_chat(_one(inputs), tokenizer))

    def complete(self, inputs: Inputs, tokenizer: Any) -> Union[CompletionResult, List[CompletionResult]]:
        """Continue ``inputs['text']`` (BOS + text, no chat format); returns ``{'text', 'finish_reason', 'usage'}``.

        ``text`` is the continuation, or prompt + continuation with ``echo=True``.

        Example:
            >>> out = model.complete({"text": "[INST] Where is the capital of Zhejiang? [/INST]",
            ...                       "max_new_tokens": 4}, tokenizer)
            >>> out["text"], out["finish_reason"], out["usage"]["completion_tokens"]
            (' The capital of Zhejiang', 'length', 4)
        """
        prepared = self.prepare_completion(inputs, tokenizer)
        return self.decode_prepared(prepared, self.generate_prepared(prepared))

    def stream_complete(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[CompletionResult]:
        """Like :meth:`complete`, yielding ``{'text': text so far, 'finish_reason', 'usage'}``."""
        return self.stream_prepared(self.prepare_completion(_one(inputs), tokenizer))

    # -- the same, step by step: tokenize, generate, decode --------------------

    def prepare_chat(self, inputs: Inputs, tokenizer: Any) -> Union[Prompt, List[Prompt]]:
        """Validate ``chat()`` inputs and build Meta's prompt ids (dropping old rounds to fit).

        Example:
            >>> prompt = model.prepare_chat({"text": "Hi!"}, tokenizer)
            >>> prompt.token_ids[:1], prompt.kind
            ((1,), 'chat')
        """
        sp = self._remember_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            return [self._checked(chat_prompt(r, sp, self.engine.context_length), f"inputs[{i}]")
                    for i, r in enumerate(parse_batch(inputs, parse_chat_inputs))]
        return self._checked(chat_prompt(parse_chat_inputs(inputs), sp, self.engine.context_length))

    def prepare_completion(self, inputs: Inputs, tokenizer: Any) -> Union[Prompt, List[Prompt]]:
        """Validate ``complete()`` inputs and encode BOS + text."""
        sp = self._remember_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            return [self._checked(completion_prompt(r, sp, self.engine.context_length), f"inputs[{i}]")
                    for i, r in enumerate(parse_batch(inputs, parse_completion_inputs))]
        return self._checked(completion_prompt(parse_completion_inputs(inputs), sp, self.engine.context_length))

    def generate_prepared(self, prepared: Union[Prompt, List[Prompt]]) -> Union[Generation, List[Generation]]:
        """Generate for one prompt or a list (run together by the engine)."""
        prompts = prepared if isinstance(prepared, list) else [prepared]
        ids: Dict[str, List[int]] = {p.request_id: [] for p in prompts}
        texts: Dict[str, List[str]] = {p.request_id: [] for p in prompts}
        done: Dict[str, Generation] = {}
        for delta in decode_stream(self.engine, prompts, self._tokenizer_for_decoding()):
            ids[delta.request_id].extend(delta.token_ids)
            texts[delta.request_id].append(delta.text)
            if delta.finish_reason is not None:
                done[delta.request_id] = Generation(tuple(ids[delta.request_id]), "".join(texts[delta.request_id]),
                                                    delta.finish_reason, delta.usage)
        generations = [done[p.request_id] for p in prompts]
        return generations if isinstance(prepared, list) else generations[0]

    def decode_prepared(self, prepared: Union[Prompt, List[Prompt]],
                        generated: Union[Generation, List[Generation]]) -> Union[Output, List[Output]]:
        """The caller's result dict(s) for generated text: :class:`ChatResult` or :class:`CompletionResult`."""
        if isinstance(prepared, list):
            return [shape_result(p, g.text, g.finish_reason, g.usage) for p, g in zip(prepared, generated)]
        return shape_result(prepared, generated.text, generated.finish_reason, generated.usage)

    def stream_prepared(self, prepared: Prompt) -> Iterator[Output]:
        """Generate, yielding the result dict each time the visible text grows; the last is the final result."""
        text, last = "", shape_result(prepared, "", None, None)
        for delta in decode_stream(self.engine, [prepared], self._tokenizer_for_decoding()):
            text += delta.text
            item = shape_result(prepared, text, delta.finish_reason, delta.usage)
            if item != last or delta.finish_reason is not None:
                last = item
                yield item

    # -- internals ----------------------------------------------------------

    def _checked(self, prompt: Prompt, where: str = "inputs") -> Prompt:
        self.engine.check_sampling(prompt.sampling, where)
        return prompt

    def _remember_tokenizer(self, tokenizer: Any) -> Llama2Tokenizer:
        # Decoding later uses the same tokenizer.model the prompt was encoded with.
        self._text_tokenizer = sentencepiece_tokenizer(tokenizer)
        return self._text_tokenizer

    def _tokenizer_for_decoding(self) -> Llama2Tokenizer:
        if self._text_tokenizer is None:
            self._text_tokenizer = Llama2Tokenizer.from_pretrained(self.model_dir)
        return self._text_tokenizer


def shape_result(prompt: Prompt, text: str, finish_reason: Optional[str], usage: Optional[Usage]) -> Output:
    """The result dict a caller of ``chat()``/``complete()`` gets for ``text`` generated from ``prompt``."""
    usage_dict = usage_as_dict(usage) if usage is not None else None
    if prompt.kind == "completion":
        return CompletionResult(text=prompt.message + text if prompt.echo else text, finish_reason=finish_reason,
                                usage=usage_dict)
    response = answer_text(text)
    if prompt.tools is not None:
        return _tool_result(prompt, response, finish_reason, usage_dict)
    return ChatResult(response=response, history=[*prompt.history, (prompt.message, response)],
                      finish_reason=finish_reason, usage=usage_dict, dropped_rounds=prompt.dropped_rounds)


def _tool_result(prompt: Prompt, generated: str, finish_reason: Optional[str],
                 usage: Optional[UsageDict]) -> ChatResult:
    """A chat answer in the tool format: the plain answer's text, or the calls; history keeps what was generated."""
    content, calls = parse_tool_output(generated, prompt.tools) if finish_reason else ("", ())
    if calls and finish_reason == "eos":
        finish_reason = "tool_calls"
    return ChatResult(response=content or "", history=[*prompt.history, (prompt.message, content or generated)],
                      finish_reason=finish_reason, usage=usage, dropped_rounds=prompt.dropped_rounds,
                      tool_calls=[call.as_openai() for call in calls])


def usage_as_dict(usage: Usage) -> UsageDict:
    return UsageDict(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                     total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens)


def _one(inputs: Any) -> Dict[str, Any]:
    if isinstance(inputs, (list, tuple)):
        raise TypeError("inputs: stream one input dict at a time, not a list")
    return inputs


class Llama2ForChat(ChatMethods, LlamaForCausalLM, TorchModel):
    """Llama 2 (chat) for ModelScope: transformers' ``LlamaForCausalLM`` plus :class:`ChatMethods`.

    Built by ``modelscope.Model.from_pretrained(dir_or_id, device=..., device_map=...,
    torch_dtype=...)`` once ``modelscope_llama2`` is imported; with
    ``llm_framework='vllm'`` (and vLLM's own settings) that call builds an
    :class:`EngineChatModel` on vLLM instead. The forward pass, weights and
    ``generate()`` are transformers' own.

    KV caches of recent generations are kept in :attr:`prompt_cache`, so a
    conversation's next turn only prefills its new tokens; see
    :meth:`set_prompt_cache`.
    """

    # TorchModel.__call__ routes calls through ModelScope's postprocess;
    # generate(), torch.compile and accelerate's hooks expect nn.Module's.
    __call__ = torch.nn.Module.__call__

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.engine = TransformersEngine(self, PromptCache())

    @classmethod
    def _instantiate(cls, model_dir: Optional[str] = None, device: Optional[str] = None, **kwargs: Any):
        """Called by ModelScope's builder with the checkpoint dir and the caller's kwargs."""
        framework = kwargs.pop(LLM_FRAMEWORK_KEY, None) or DEFAULT_ENGINE
        if framework not in ENGINES:
            raise ValueError(f"{LLM_FRAMEWORK_KEY}: expected one of {list(ENGINES)}, got {framework!r}")
        if "torch_dtype" in kwargs:  # transformers 5 and vLLM call it dtype
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        if framework == "vllm":
            from .engines.vllm_engine import VllmEngine

            return EngineChatModel(model_dir, VllmEngine(model_dir, **kwargs))
        model = cls.from_pretrained(model_dir, **kwargs)
        if device is not None and kwargs.get("device_map") is None:
            model.to(device)
        model.model_dir = model_dir
        return model.eval()

    @property
    def prompt_cache(self) -> PromptCache:
        """The KV caches kept for the next turns (see :mod:`~modelscope_llama2.engines.prefix_cache`)."""
        return self.engine.prefix_cache

    def set_prompt_cache(self, max_entries: int = 4, max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> PromptCache:
        """Replace the KV-cache pool; ``max_entries=0`` turns reuse off, ``max_bytes=None`` lifts the byte bound.

        Example:
            >>> model.set_prompt_cache(max_entries=8, max_bytes=2 << 30).max_entries
            8
        """
        self.engine.prefix_cache = PromptCache(max_entries=max_entries, max_bytes=max_bytes)
        return self.engine.prefix_cache

    def save_pretrained(self, save_directory: Union[str, os.PathLike], tokenizer: Any = None,
                        max_shard_size: Union[int, str] = "2GB", **_: Any) -> str:
        """Write a complete ModelScope checkpoint (atomically); see :func:`save_checkpoint`."""
        return save_checkpoint(self, save_directory, tokenizer=tokenizer, max_shard_size=max_shard_size)


class EngineChatModel(ChatMethods, Model):
    """A ModelScope model whose engine holds the weights itself (vLLM): :class:`ChatMethods` only."""

    def __init__(self, model_dir: str, engine: Engine, **kwargs: Any):
        super().__init__(model_dir, **kwargs)
        self.model_dir = model_dir
        self.engine = engine

    def forward(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        raise TypeError(f"{type(self).__name__} has no forward pass of its own; use chat(), complete() "
                        "or a pipeline")

    def close(self) -> None:
        """Shut the engine down (its processes and memory)."""
        self.engine.close()
