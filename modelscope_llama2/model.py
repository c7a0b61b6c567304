"""The Llama 2 chat model as a ModelScope model: transformers' ``LlamaForCausalLM`` plus ``chat()``.

Example:
    >>> import torch, modelscope_llama2
    >>> from modelscope import Model
    >>> model = Model.from_pretrained("path/to/Llama-2-13b-chat-ms", device_map="auto",
    ...                               torch_dtype=torch.float16)  # doctest: +SKIP
    >>> tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(model.model_dir)  # doctest: +SKIP
    >>> out = model.chat({"text": "Where is the capital of Zhejiang?", "max_length": 512}, tokenizer)  # doctest: +SKIP
    >>> out = model.chat({"text": "And its famous places?", "history": out["history"]}, tokenizer)  # doctest: +SKIP
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from modelscope.models.base import TorchModel
from modelscope.outputs import OutputKeys
from transformers import LlamaForCausalLM

from .prompts.chat_format import fit_dialog
from .checkpoints.save import save_checkpoint
from .prompts.requests import (
    ChatRequest,
    CompletionRequest,
    GenerationSpec,
    check_same_settings,
    parse_batch,
    parse_chat_inputs,
    parse_completion_inputs,
)
from .engines.transformers_engine import Generated, finish, iterate_in_thread, run_generate, visible_text
from .engines.prefix_cache import DEFAULT_MAX_BYTES, PromptCache
from .tokenizer import Llama2Tokenizer, sentencepiece_tokenizer

logger = logging.getLogger(__name__)

# Without max_new_tokens, the prompt may use max_length minus this much, so
# that dropping old rounds always leaves room for an answer.
RESPONSE_RESERVE = 256

Inputs = Union[Dict[str, Any], Sequence[Dict[str, Any]]]
Output = Dict[str, Any]


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated request turned into prompt ids: what ``generate_prepared`` consumes.

    ``decode`` turns new ids into text and ``output`` shapes that text (and a
    finish reason) into the caller's dict, so chat and plain completion share
    one generation path.
    """

    token_ids: List[int]
    max_new_tokens: int
    spec: GenerationSpec
    tokenizer: Llama2Tokenizer
    decode: Callable[[List[int]], str]
    output: Callable[[str, Optional[str]], Output]


class Llama2ForChat(LlamaForCausalLM, TorchModel):
    """Llama 2 (chat) for ModelScope: ``chat``, ``stream_chat``, ``complete``, ``stream_complete``.

    Built by ``modelscope.Model.from_pretrained(dir_or_id, device=..., device_map=...,
    torch_dtype=...)`` once ``modelscope_llama2`` is imported. The forward
    pass, weights and ``generate()`` are transformers' own.

    KV caches of recent generations are kept in :attr:`prompt_cache`, so a
    conversation's next turn only prefills its new tokens; see
    :meth:`set_prompt_cache`.
    """

    # TorchModel.__call__ routes calls through ModelScope's postprocess;
    # generate(), torch.compile and accelerate's hooks expect nn.Module's.
    __call__ = torch.nn.Module.__call__

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.prompt_cache = PromptCache()

    @classmethod
    def _instantiate(cls, model_dir: Optional[str] = None, device: Optional[str] = None, **kwargs: Any):
        """Called by ModelScope's builder with the checkpoint dir and the caller's kwargs."""
        if "torch_dtype" in kwargs:  # transformers 5 calls it dtype
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        model = cls.from_pretrained(model_dir, **kwargs)
        if device is not None and kwargs.get("device_map") is None:
            model.to(device)
        model.model_dir = model_dir
        return model.eval()

    def set_prompt_cache(self, max_entries: int = 4, max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> PromptCache:
        """Replace the KV-cache pool; ``max_entries=0`` turns reuse off, ``max_bytes=None`` lifts the byte bound.

        Example:
            >>> model.set_prompt_cache(max_entries=8, max_bytes=2 << 30)  # doctest: +SKIP
        """
        self.prompt_cache = PromptCache(max_entries=max_entries, max_bytes=max_bytes)
        return self.prompt_cache

    def save_pretrained(self, save_directory: Union[str, os.PathLike], tokenizer: Any = None,
                        max_shard_size: Union[int, str] = "2GB", **_: Any) -> str:
        """Write a complete ModelScope checkpoint (atomically); see :func:`save_checkpoint`."""
        return save_checkpoint(self, save_directory, tokenizer=tokenizer, max_shard_size=max_shard_size)

    # -- the documented entry points -----------------------------------------

    def chat(self, inputs: Inputs, tokenizer: Any) -> Union[Output, List[Output]]:
        """Answer the last user message in Meta's Llama 2 chat format.

        ``inputs``: ``text`` (required) or ``messages``; ``system``, ``history``
        (list of (user, assistant) pairs), ``max_length`` (prompt + response
        tokens), ``stop``, ``seed``, ``allow_special_tags`` and transformers
        generation settings (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ...). Sampling defaults come from the checkpoint's
        ``generation_config.json``. A list of dicts runs as one padded batch.

        Returns ``{'response', 'history', 'finish_reason'}`` (``eos``, ``stop``
        or ``length``); ``history`` is a new list ending with (text, response).

        Example:
            >>> out = model.chat({"text": "Hi!", "system": "Be brief.", "do_sample": False}, tokenizer)  # doctest: +SKIP
            >>> out["response"], out["history"]  # doctest: +SKIP
        """
        prepared = self.prepare_chat(inputs, tokenizer)
        return self.decode_prepared(prepared, self.generate_prepared(prepared))

    def stream_chat(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[Output]:
        """Like :meth:`chat`, yielding ``{'response': text so far, 'history', 'finish_reason'}``.

        Streamed text never ends in a broken multi-byte character, each item
        is a prefix of the next, and the last item equals :meth:`chat`'s output
        (``finish_reason`` is ``None`` until then). Input is checked on the call,
        before the iterator is returned.

        Example:
            >>> for out in model.stream_chat({"text": "Hi!"}, tokenizer):  # doctest: +SKIP
            ...     print(out["response"])
        """
        return self.stream_prepared(self._prepare_one(inputs, tokenizer, self.prepare_chat))

    def complete(self, inputs: Inputs, tokenizer: Any) -> Union[Output, List[Output]]:
        """Continue ``inputs['text']`` (BOS + text, no chat format); returns ``{'text', 'finish_reason'}``.

        ``text`` is the continuation, or prompt + continuation with ``echo=True``.

        Example:
            >>> model.complete({"text": "The capital of Zhejiang is", "max_new_tokens": 8}, tokenizer)  # doctest: +SKIP
        """
        prepared = self.prepare_completion(inputs, tokenizer)
        return self.decode_prepared(prepared, self.generate_prepared(prepared))

    def stream_complete(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[Output]:
        """Like :meth:`complete`, yielding ``{'text': text so far, 'finish_reason'}``."""
        return self.stream_prepared(self._prepare_one(inputs, tokenizer, self.prepare_completion))

    # -- the same, step by step: tokenize, generate, decode --------------------

    def prepare_chat(self, inputs: Inputs, tokenizer: Any) -> Union[PreparedPrompt, List[PreparedPrompt]]:
        """Validate ``chat()`` inputs and build Meta's prompt ids (dropping old rounds to fit).

        Example:
            >>> prepared = model.prepare_chat({"text": "Hi!"}, tokenizer)  # doctest: +SKIP
            >>> model.decode_prepared(prepared, model.generate_prepared(prepared))  # doctest: +SKIP
        """
        sp = sentencepiece_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            return [self._prepare_chat(request, sp) for request in parse_batch(inputs, parse_chat_inputs)]
        return self._prepare_chat(parse_chat_inputs(inputs), sp)

    def prepare_completion(self, inputs: Inputs, tokenizer: Any) -> Union[PreparedPrompt, List[PreparedPrompt]]:
        """Validate ``complete()`` inputs and encode BOS + text."""
        sp = sentencepiece_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            return [self._prepare_completion(r, sp) for r in parse_batch(inputs, parse_completion_inputs)]
        return self._prepare_completion(parse_completion_inputs(inputs), sp)

    def generate_prepared(
        self, prepared: Union[PreparedPrompt, List[PreparedPrompt]]
    ) -> Union[Generated, List[Generated]]:
        """New token ids for one prepared prompt (reusing cached KV) or a list (one padded batch)."""
        if isinstance(prepared, list):
            return self._generate_batch(prepared)
        return self._generate_one(prepared)

    def decode_prepared(
        self, prepared: Union[PreparedPrompt, List[PreparedPrompt]], generated: Union[Generated, List[Generated]]
    ) -> Union[Output, List[Output]]:
        """The caller's output dict(s) for generated ids: text cut at stops, finish reason."""
        if isinstance(prepared, list):
            return [self.decode_prepared(p, g) for p, g in zip(prepared, generated)]
        text, stopped = visible_text(prepared.decode, generated.token_ids, prepared.spec.stop, final=True)
        return prepared.output(text, "stop" if stopped else generated.finish_reason)

    def stream_prepared(self, prepared: PreparedPrompt) -> Iterator[Output]:
        """Generate in a worker thread, yielding the output dict each time the visible text grows."""
        def run(streamer: Any, cancel: Any) -> Generated:
            return self._generate_one(prepared, streamer=streamer, cancel=cancel)

        ids: List[int] = []
        last = prepared.output("", None)  # nothing worth showing until some text arrives
        for kind, value in iterate_in_thread(run):
            if kind == "done":
                yield self.decode_prepared(prepared, value)
            elif value != prepared.tokenizer.eos_token_id:
                ids.append(value)
                item = prepared.output(visible_text(prepared.decode, ids, prepared.spec.stop, final=False)[0], None)
                if item != last:
                    last = item
                    yield item

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _prepare_one(inputs: Any, tokenizer: Any, prepare: Callable) -> PreparedPrompt:
        if isinstance(inputs, (list, tuple)):
            raise TypeError("inputs: stream one input dict at a time, not a list")
        return prepare(inputs, tokenizer)

    def _limits(self, spec: GenerationSpec) -> Tuple[int, int]:
        """``(total token limit, tokens kept for the response)`` for a request."""
        context = self.config.max_position_embeddings
        limit = min(spec.max_length or context, context)
        if spec.max_new_tokens is not None and spec.max_new_tokens >= limit:
            raise ValueError(
                f"max_new_tokens: {spec.max_new_tokens} leaves no room for the prompt within "
                f"{limit} tokens (max_length and the model's context of {context})"
            )
        return limit, spec.max_new_tokens or min(RESPONSE_RESERVE, limit // 4)

    def _prepare_chat(self, request: ChatRequest, sp: Llama2Tokenizer) -> PreparedPrompt:
        limit, reserve = self._limits(request.spec)
        prompt_ids, dropped = fit_dialog(request.dialog, sp.sp_model.encode, sp.bos_token_id, sp.eos_token_id,
                                         budget=limit - reserve)
        if dropped:
            logger.warning("history: dropped the %d oldest round(s) so the prompt (%d tokens) and the "
                           "response fit in %d tokens", dropped, len(prompt_ids), limit)

        def output(text: str, finish_reason: Optional[str]) -> Output:
            text = text.strip()
            return {
                OutputKeys.RESPONSE: text,
                OutputKeys.HISTORY: [*request.history, (request.dialog[-1]["content"], text)],
                "finish_reason": finish_reason,
            }

        return PreparedPrompt(prompt_ids, _max_new(request.spec, limit, len(prompt_ids)), request.spec, sp,
                              sp.decode, output)

    def _prepare_completion(self, request: CompletionRequest, sp: Llama2Tokenizer) -> PreparedPrompt:
        limit, reserve = self._limits(request.spec)
        body = sp.encode(request.text)
        if len(body) + 1 > limit - reserve:
            raise ValueError(f"text: the prompt takes {len(body) + 1} tokens, more than the {limit - reserve} "
                             "tokens it may use (max_length minus the tokens reserved for the continuation)")
        prefix = sp.decode(body)

        def decode(ids: List[int]) -> str:
            # Decoded after the prompt, so the continuation keeps its leading space.
            return sp.decode(body + list(ids))[len(prefix):]

        def output(text: str, finish_reason: Optional[str]) -> Output:
            return {OutputKeys.TEXT: request.text + text if request.echo else text, "finish_reason": finish_reason}

        return PreparedPrompt([sp.bos_token_id, *body], _max_new(request.spec, limit, len(body) + 1),
                              request.spec, sp, decode, output)

    def _input_device(self) -> torch.device:
        # With a device_map the embedding may sit anywhere; inputs go where it is.
        device = self.get_input_embeddings().weight.device
        return self.device if device.type == "meta" else device

    def _generate_one(self, prepared: PreparedPrompt, streamer: Any = None, cancel: Any = None) -> Generated:
        prompt_ids, sp = prepared.token_ids, prepared.tokenizer
        checked_out = self.prompt_cache.checkout(prompt_ids)
        input_ids = torch.tensor([prompt_ids], device=self._input_device())
        new_ids, cache = run_generate(self, input_ids, prepared.spec, prepared.max_new_tokens, prepared.decode,
                                      pad_token_id=sp.pad_token_id, cache=checked_out[0] if checked_out else None,
                                      streamer=streamer, cancel=cancel)
        new_ids = new_ids[0].tolist()
        self.prompt_cache.checkin(prompt_ids + new_ids, cache, len(prompt_ids))
        return finish(new_ids, sp.eos_token_id, prepared.max_new_tokens)

    def _generate_batch(self, prepared: List[PreparedPrompt]) -> List[Generated]:
        spec, sp = prepared[0].spec, prepared[0].tokenizer
        check_same_settings([p.spec for p in prepared])
        width = max(len(p.token_ids) for p in prepared)
        rows = [[sp.pad_token_id] * (width - len(p.token_ids)) + p.token_ids for p in prepared]
        masks = [[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prepared]
        device = self._input_device()
        # Stop strings are checked on each row's own text by the same decoder.
        new_ids, _ = run_generate(self, torch.tensor(rows, device=device), spec,
                                  max(p.max_new_tokens for p in prepared), sp.decode, pad_token_id=sp.pad_token_id,
                                  attention_mask=torch.tensor(masks, device=device))
        return [finish(row, sp.eos_token_id, p.max_new_tokens) for row, p in zip(new_ids.tolist(), prepared)]


def _max_new(spec: GenerationSpec, limit: int, prompt_len: int) -> int:
    return min(spec.max_new_tokens or limit, limit - prompt_len)
