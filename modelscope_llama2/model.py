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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from modelscope.models.base import TorchModel
from modelscope.outputs import OutputKeys
from transformers import LlamaForCausalLM

from .chat_format import fit_dialog
from .chat_inputs import (
    ChatRequest,
    CompletionRequest,
    GenerationSpec,
    parse_batch,
    parse_chat_inputs,
    parse_completion_inputs,
)
from .generation import Generated, finish, iterate_in_thread, run_generate, visible_text
from .prompt_cache import PromptCache
from .tokenizer import VOCAB_FILE, Llama2Tokenizer, sentencepiece_tokenizer

logger = logging.getLogger(__name__)

# Without max_new_tokens, the prompt may use max_length minus this much, so
# that dropping old rounds always leaves room for an answer.
RESPONSE_RESERVE = 256

Inputs = Union[Dict[str, Any], Sequence[Dict[str, Any]]]


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

    def set_prompt_cache(self, max_entries: int = 4, max_bytes: Optional[int] = None) -> PromptCache:
        """Replace the KV-cache pool; ``max_entries=0`` turns reuse off.

        Example:
            >>> model.set_prompt_cache(max_entries=8, max_bytes=2 << 30)  # doctest: +SKIP
        """
        self.prompt_cache = PromptCache(max_entries=max_entries, max_bytes=max_bytes)
        return self.prompt_cache

    def save_pretrained(self, save_directory: Union[str, os.PathLike], tokenizer: Any = None,
                        max_shard_size: Union[int, str] = "2GB", **_: Any) -> str:
        """Write a complete ModelScope checkpoint (atomically); see :func:`save_checkpoint`."""
        from .checkpoint import save_checkpoint

        if tokenizer is None and getattr(self, "model_dir", None):
            vocab = os.path.join(self.model_dir, VOCAB_FILE)
            tokenizer = Llama2Tokenizer(vocab) if os.path.isfile(vocab) else None
        return save_checkpoint(self, save_directory, tokenizer=tokenizer, max_shard_size=max_shard_size)

    # -- chat ---------------------------------------------------------------

    def chat(self, inputs: Inputs, tokenizer: Any) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
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
        sp = sentencepiece_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            requests = parse_batch(inputs, parse_chat_inputs)
            prompts = [self._chat_prompt(request, sp) for request in requests]
            results = self._generate_batch(prompts, requests[0].spec, sp)
            return [_chat_output(r, *_final_text(g, sp.decode, r.spec.stop)) for r, g in zip(requests, results)]
        request = parse_chat_inputs(inputs)
        prompt_ids, max_new = self._chat_prompt(request, sp)
        generated = self._generate_one(prompt_ids, request.spec, max_new, sp)
        return _chat_output(request, *_final_text(generated, sp.decode, request.spec.stop))

    def stream_chat(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[Dict[str, Any]]:
        """Like :meth:`chat`, yielding ``{'response': text so far, 'history', 'finish_reason'}``.

        Streamed text never ends in a broken multi-byte character, each item
        is a prefix of the next, and the last item equals :meth:`chat`'s output
        (``finish_reason`` is ``None`` until then).

        Example:
            >>> for out in model.stream_chat({"text": "Hi!"}, tokenizer):  # doctest: +SKIP
            ...     print(out["response"])
        """
        sp = sentencepiece_tokenizer(tokenizer)
        request = parse_chat_inputs(inputs)
        prompt_ids, max_new = self._chat_prompt(request, sp)
        return self._stream(prompt_ids, request.spec, max_new, sp, sp.decode,
                            lambda text, reason: _chat_output(request, text, reason))

    # -- plain completion ---------------------------------------------------

    def complete(self, inputs: Inputs, tokenizer: Any) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        """Continue ``inputs['text']`` (BOS + text, no chat format); returns ``{'text', 'finish_reason'}``.

        ``text`` is the continuation, or prompt + continuation with ``echo=True``.

        Example:
            >>> model.complete({"text": "The capital of Zhejiang is", "max_new_tokens": 8}, tokenizer)  # doctest: +SKIP
        """
        sp = sentencepiece_tokenizer(tokenizer)
        if isinstance(inputs, (list, tuple)):
            requests = parse_batch(inputs, parse_completion_inputs)
            prompts = [self._completion_prompt(request, sp) for request in requests]
            results = self._generate_batch(prompts, requests[0].spec, sp)
            return [_completion_output(r, *_final_text(g, _continuation_decoder(r, sp), r.spec.stop))
                    for r, g in zip(requests, results)]
        request = parse_completion_inputs(inputs)
        prompt_ids, max_new = self._completion_prompt(request, sp)
        generated = self._generate_one(prompt_ids, request.spec, max_new, sp)
        return _completion_output(request, *_final_text(generated, _continuation_decoder(request, sp), request.spec.stop))

    def stream_complete(self, inputs: Dict[str, Any], tokenizer: Any) -> Iterator[Dict[str, Any]]:
        """Like :meth:`complete`, yielding ``{'text': text so far, 'finish_reason'}``."""
        sp = sentencepiece_tokenizer(tokenizer)
        request = parse_completion_inputs(inputs)
        prompt_ids, max_new = self._completion_prompt(request, sp)
        decode = _continuation_decoder(request, sp)
        return self._stream(prompt_ids, request.spec, max_new, sp, decode,
                            lambda text, reason: _completion_output(request, text, reason))

    # -- internals ----------------------------------------------------------

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

    def _chat_prompt(self, request: ChatRequest, sp: Llama2Tokenizer) -> Tuple[List[int], int]:
        limit, reserve = self._limits(request.spec)
        prompt_ids, dropped = fit_dialog(request.dialog, sp.sp_model.encode, sp.bos_token_id, sp.eos_token_id,
                                         budget=limit - reserve)
        if dropped:
            logger.warning("history: dropped the %d oldest round(s) so the prompt (%d tokens) and the "
                           "response fit in %d tokens", dropped, len(prompt_ids), limit)
        return prompt_ids, _max_new(request.spec, limit, len(prompt_ids))

    def _completion_prompt(self, request: CompletionRequest, sp: Llama2Tokenizer) -> Tuple[List[int], int]:
        limit, reserve = self._limits(request.spec)
        prompt_ids = sp.encode(request.text, bos=True)
        if len(prompt_ids) > limit - reserve:
            raise ValueError(f"text: the prompt takes {len(prompt_ids)} tokens, more than the {limit - reserve} "
                             "tokens it may use (max_length minus the tokens reserved for the continuation)")
        return prompt_ids, _max_new(request.spec, limit, len(prompt_ids))

    def _input_device(self) -> torch.device:
        # With a device_map the embedding may sit anywhere; inputs go where it is.
        device = self.get_input_embeddings().weight.device
        return self.device if device.type == "meta" else device

    def _generate_one(self, prompt_ids: List[int], spec: GenerationSpec, max_new: int, sp: Llama2Tokenizer,
                      streamer: Any = None, cancel: Any = None) -> Generated:
        checked_out = self.prompt_cache.checkout(prompt_ids)
        input_ids = torch.tensor([prompt_ids], device=self._input_device())
        new_ids, cache = run_generate(self, input_ids, spec, max_new, sp.decode, pad_token_id=sp.pad_token_id,
                                      cache=checked_out[0] if checked_out else None,
                                      streamer=streamer, cancel=cancel)
        new_ids = new_ids[0].tolist()
        self.prompt_cache.checkin(prompt_ids + new_ids, cache, len(prompt_ids))
        return finish(new_ids, sp.eos_token_id, max_new)

    def _generate_batch(self, prompts: List[Tuple[List[int], int]], spec: GenerationSpec,
                        sp: Llama2Tokenizer) -> List[Generated]:
        width = max(len(ids) for ids, _ in prompts)
        pad = sp.pad_token_id
        rows = [[pad] * (width - len(ids)) + ids for ids, _ in prompts]
        masks = [[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts]
        device = self._input_device()
        new_ids, _ = run_generate(self, torch.tensor(rows, device=device), spec, max(m for _, m in prompts),
                                  sp.decode, pad_token_id=pad, attention_mask=torch.tensor(masks, device=device))
        return [finish(row, sp.eos_token_id, max_new) for row, (_, max_new) in zip(new_ids.tolist(), prompts)]

    def _stream(self, prompt_ids: List[int], spec: GenerationSpec, max_new: int, sp: Llama2Tokenizer,
                decode: Callable[[List[int]], str],
                output: Callable[[str, Optional[str]], Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        def run(streamer: Any, cancel: Any) -> Generated:
            return self._generate_one(prompt_ids, spec, max_new, sp, streamer=streamer, cancel=cancel)

        ids: List[int] = []
        last = output("", None)  # nothing worth showing until some text arrives
        for kind, value in iterate_in_thread(run):
            if kind == "done":
                yield output(*_final_text(value, decode, spec.stop))
            elif value != sp.eos_token_id:
                ids.append(value)
                item = output(visible_text(decode, ids, spec.stop, final=False)[0], None)
                if item != last:
                    last = item
                    yield item


def _max_new(spec: GenerationSpec, limit: int, prompt_len: int) -> int:
    return min(spec.max_new_tokens or limit, limit - prompt_len)


def _final_text(generated: Generated, decode: Callable, stops: Sequence[str]) -> Tuple[str, str]:
    text, stopped = visible_text(decode, generated.token_ids, stops, final=True)
    return text, "stop" if stopped else generated.finish_reason


def _chat_output(request: ChatRequest, text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
    text = text.strip()
    return {
        OutputKeys.RESPONSE: text,
        OutputKeys.HISTORY: [*request.history, (request.dialog[-1]["content"], text)],
        "finish_reason": finish_reason,
    }


def _completion_output(request: CompletionRequest, text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
    return {OutputKeys.TEXT: request.text + text if request.echo else text, "finish_reason": finish_reason}


def _continuation_decoder(request: CompletionRequest, sp: Llama2Tokenizer) -> Callable[[List[int]], str]:
    """Decode new ids in the context of the prompt, so a leading space is kept."""
    prompt_body = sp.encode(request.text)
    prefix = sp.decode(prompt_body)
    return lambda ids: sp.decode(prompt_body + list(ids))[len(prefix):]
