"""Continuous batching on transformers' own manager: concurrent requests share forward passes.

:class:`ContinuousBatchingEngine` feeds the package's Meta-exact prompt ids
to transformers 5's ``ContinuousBatchingManager``
(``model.init_continuous_batching()``: paged attention, a scheduler that
adds and retires requests between steps, block-level prefix sharing so a
conversation's next turn reuses the KV blocks of the previous one). The
manager's background thread runs the model and hands each request's
outputs straight to that request's consumer: :meth:`ContinuousBatchingEngine.submit`
takes a callback (the server hands events to its event loop without a
thread per request), and :meth:`~ContinuousBatchingEngine.generate` is the
blocking iterator every engine has, built on it.

The manager samples with one generation config for all requests and one
global random generator, and reports no logits, so it serves plain greedy
requests (``do_sample`` explicitly ``False``; bit-for-bit what
``generate()`` gives; :func:`batchable`); the rest go to ``fallback`` (by
default a :class:`~.transformers_engine.TransformersEngine` on the same
model, one request at a time): sampled, seeded, or leaving it to the
checkpoint's defaults; any option but those greedy ignores
(``repetition_penalty``, ``min_new_tokens``, the frequency/presence
penalties, ...); ``logprobs``, ``prompt_logprobs``, ``ignore_eos``,
structured output, or no new tokens at all.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = ContinuousBatchingEngine(AutoModelForCausalLM.from_pretrained(DEMO_DIR))
    >>> prompt = Prompt(token_ids=(1, 3, 4), sampling=SamplingParams(max_new_tokens=3, options=GREEDY))
    >>> events = list(engine.generate([prompt]))
    >>> events[-1].finish_reason, events[-1].usage.prompt_tokens
    ('length', 3)
    >>> engine.close()
"""

import logging
import queue
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from ..constants import BOS_ID, CONTEXT_LENGTH, EOS_ID, PAD_ID
from ..prompts.prompt import Prompt, SamplingParams
from .base import Engine, TokenEvent, Usage
from .transformers_engine import TransformersEngine

logger = logging.getLogger(__name__)

# Prefix sharing works on whole pages: small pages let short chat turns share.
PAGE_SIZE = 32


# The options of a request the batching manager can serve.
GREEDY = {"do_sample": False}
# Sampling settings greedy decoding ignores (transformers too): a greedy request may carry them.
IGNORED_WHEN_GREEDY = frozenset({"temperature", "top_p", "top_k", "min_p"})


def batchable(sampling: SamplingParams) -> bool:
    """Whether the batching manager serves ``sampling`` exactly: greedy, unseeded, and nothing it would drop.

    Example:
        >>> batchable(SamplingParams(max_new_tokens=8, options={"do_sample": False, "temperature": 0.7}))
        True
        >>> batchable(SamplingParams(max_new_tokens=8, options={"do_sample": False, "repetition_penalty": 1.2}))
        False
        >>> batchable(SamplingParams(max_new_tokens=8, options=GREEDY, logprobs=0))
        False
    """
    others = set(sampling.options) - set(GREEDY) - IGNORED_WHEN_GREEDY
    return (sampling.greedy and not others and sampling.seed is None and sampling.logprobs is None
            and sampling.prompt_logprobs is None and not sampling.ignore_eos and sampling.structured is None
            and sampling.max_new_tokens > 0)


class ContinuousBatchingEngine(Engine):
    """Greedy requests batched continuously by transformers; the rest (:func:`batchable`) through ``fallback``.

    ``kv_cache_bytes``: memory for the paged KV cache (it bounds how many
    tokens all running requests hold together). ``max_batch_tokens``: tokens
    in one forward pass (long prompts are prefilled in chunks of this size).
    """

    name = "transformers-continuous-batching"

    def __init__(self, model: Any, fallback: Optional[Engine] = None, kv_cache_bytes: int = 1 << 30,
                 max_batch_tokens: int = 512):
        self.model = model
        self.context_length = getattr(model.config, "max_position_embeddings", CONTEXT_LENGTH)
        self.fallback = fallback if fallback is not None else TransformersEngine(model)
        self.sampling_options = self.fallback.sampling_options
        self._fallback_lock = threading.Lock()  # the fallback's prefix cache serves one request at a time
        self._streams: Dict[str, "_Stream"] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               max_new_tokens=self.context_length),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE_SIZE, num_blocks=_num_blocks(model.config, kv_cache_bytes, model.dtype,
                                                             self.context_length),
                max_batch_tokens=max_batch_tokens),
        )
        self.manager.start()
        self._warm_up()
        self._count_prefix_hits()

    def submit(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        """Start generating for ``prompt``; ``on_event`` gets its events, from a background thread.

        The last event has ``finish_reason``; none follows it. ``on_event``
        must return quickly (it runs on the thread that drives the model).
        """
        if self._closed:
            raise RuntimeError("the continuous batching engine is closed")
        if not batchable(prompt.sampling):
            threading.Thread(target=self._run_fallback, args=(prompt, on_event), daemon=True,
                             name="fallback-generate").start()
            return
        stream = _Stream(prompt, on_event, self._forget)
        with self._lock:
            if prompt.request_id in self._streams:
                raise ValueError(f"request_id {prompt.request_id!r} is already generating")
            self._streams[prompt.request_id] = stream
        router = self.manager.output_router
        with router._lock:
            # The manager's own routing hook (what register_result_handler fills for an
            # asyncio loop); an inline "loop" delivers on the manager's thread, no hop.
            router.result_handlers[prompt.request_id] = (stream.on_output, _INLINE)
        self.manager.add_request(list(prompt.token_ids), request_id=prompt.request_id,
                                 max_new_tokens=prompt.sampling.max_new_tokens, streaming=True)

    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        prompts = list(prompts)
        events: "queue.Queue[TokenEvent]" = queue.Queue()
        unfinished = {p.request_id for p in prompts}
        try:
            for prompt in prompts:
                self.submit(prompt, events.put)
            while unfinished:
                event = events.get()
                if event.finished:
                    unfinished.discard(event.request_id)
                yield event
        finally:
            for request_id in unfinished:  # the consumer left early
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            self.fallback.abort(request_id)
            return
        self.manager.cancel_request(request_id)
        stream.abort()  # a cancelled request gets no output from the manager

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.manager.stop(block=True, timeout=30)
        self.model.destroy_cached_continuous_batching_manager()
        self.fallback.close()

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def _warm_up(self) -> None:
        # The first steps allocate the cache and pick kernels; pay that before the first client.
        prompt = Prompt(token_ids=(BOS_ID, 3, 4, 5), sampling=SamplingParams(max_new_tokens=4, options=GREEDY))
        for _ in self.generate([prompt]):
            pass

    def _count_prefix_hits(self) -> None:
        """Record, per request, the prompt tokens the manager found in shared KV blocks.

        The manager does not report them in its outputs; its cache's
        ``search_prefix_match`` (called once when a request is scheduled) returns them.
        """
        cache = self.manager.batch_processor.cache
        search = cache.search_prefix_match

        def search_and_count(request_id: str, prompt_ids: List[int]) -> int:
            matched = search(request_id, prompt_ids)
            with self._lock:
                stream = self._streams.get(request_id)
            if stream is not None:
                stream.cached = matched
            return matched

        cache.search_prefix_match = search_and_count

    def _run_fallback(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        """Requests the manager cannot serve exactly: the eager engine, one at a time, its events passed on."""
        finished = False
        try:
            with self._fallback_lock:
                for event in self.fallback.generate([prompt]):
                    finished = event.finished
                    on_event(event)
        finally:
            if not finished:  # failed: the consumer still gets a last event
                on_event(TokenEvent(prompt.request_id, (), "abort", Usage(len(prompt.token_ids), 0)))


class _Inline:
    """Stands in for an event loop in the manager's output router: runs callbacks where they are called."""

    @staticmethod
    def call_soon_threadsafe(callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)


_INLINE = _Inline()


class _Stream:
    """One request: the manager's outputs (full token lists) turned into new-id events, finished once."""

    def __init__(self, prompt: Prompt, on_event: Callable[[TokenEvent], None], forget: Callable[[str], None]):
        self.prompt, self.on_event, self.forget = prompt, on_event, forget
        self.seen = self.cached = 0
        self.done = False
        self._lock = threading.Lock()  # abort (any thread) and outputs (the manager's thread) race

    def on_output(self, output: Any) -> None:
        with self._lock:
            if self.done:
                return
            if output.error is not None:
                logger.error("continuous batching failed for request %s: %s", self.prompt.request_id, output.error)
                event = self._finish((), "abort")
            else:
                event = self._event(list(output.generated_tokens), output.is_finished())
        if event is not None:
            self.on_event(event)

    def abort(self) -> None:
        with self._lock:
            event = None if self.done else self._finish((), "abort")
        if event is not None:
            self.on_event(event)

    def _event(self, tokens: List[int], finished: bool) -> Optional[TokenEvent]:
        new, self.seen = tokens[self.seen:], len(tokens)
        if not finished:
            return TokenEvent(self.prompt.request_id, tuple(new)) if new else None
        if tokens and tokens[-1] == EOS_ID:
            return self._finish(tuple(new[:-1]), "eos")
        return self._finish(tuple(new), "length")

    def _finish(self, new: tuple, reason: str) -> TokenEvent:
        self.done = True
        self.forget(self.prompt.request_id)
        count = self.seen - (reason == "eos")
        usage = Usage(len(self.prompt.token_ids), max(count, 0), self.cached)
        return TokenEvent(self.prompt.request_id, new, reason, usage)


def _num_blocks(config: Any, kv_cache_bytes: int, dtype: torch.dtype, context_length: int) -> int:
    """Pages of ``PAGE_SIZE`` tokens that fit ``kv_cache_bytes`` (keys and values of every layer).

    Never more than 8 full contexts need: a small model does not take the whole budget.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return max(4, min(kv_cache_bytes // (per_token * PAGE_SIZE), 8 * context_length // PAGE_SIZE))
