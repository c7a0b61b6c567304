"""Continuous batching on transformers' own manager: concurrent requests share forward passes.

:class:`ContinuousBatchingEngine` feeds the package's Meta-exact prompt ids
to transformers 5's ``ContinuousBatchingManager``
(``model.init_continuous_batching()``: paged attention, a scheduler that
adds and retires requests between steps, block-level prefix sharing so a
conversation's next turn reuses the KV blocks of the previous one). One
background thread runs the manager; a router thread hands each request's
outputs to its own queue, so many callers can stream at once.

The manager samples with one generation config for all requests and one
global random generator, so it serves greedy requests (bit-for-bit what
``generate()`` gives); sampled or seeded requests go to ``fallback`` (by
default a :class:`~.transformers_engine.TransformersEngine` on the same
model, one request at a time).

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = ContinuousBatchingEngine(AutoModelForCausalLM.from_pretrained(DEMO_DIR))
    >>> prompt = Prompt(token_ids=(1, 3, 4), sampling=SamplingParams(max_new_tokens=3))
    >>> events = list(engine.generate([prompt]))
    >>> events[-1].finish_reason, events[-1].usage.prompt_tokens
    ('length', 3)
    >>> engine.close()
"""

import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from ..constants import BOS_ID, CONTEXT_LENGTH, EOS_ID, PAD_ID
from ..prompts.prompt import Prompt, SamplingParams
from .base import Engine, TokenEvent, Usage
from .transformers_engine import TransformersEngine

# Prefix sharing works on whole pages: small pages let short chat turns share.
PAGE_SIZE = 32


class ContinuousBatchingEngine(Engine):
    """Greedy requests batched continuously by transformers; the rest through ``fallback``.

    ``kv_cache_bytes``: memory for the paged KV cache (it bounds how many
    tokens all running requests hold together). ``max_batch_tokens``: tokens
    in one forward pass (long prompts are prefilled in chunks of this size).
    """

    name = "transformers-continuous-batching"

    def __init__(self, model: Any, fallback: Optional[Engine] = None, kv_cache_bytes: int = 1 << 30,
                 max_batch_tokens: int = 512, warmup: bool = True):
        self.model = model
        self.context_length = getattr(model.config, "max_position_embeddings", CONTEXT_LENGTH)
        self.fallback = fallback if fallback is not None else TransformersEngine(model)
        self.sampling_options = self.fallback.sampling_options
        self._fallback_lock = threading.Lock()  # the fallback's prefix cache serves one request at a time
        self._queues: Dict[str, "queue.Queue[Any]"] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               max_new_tokens=self.context_length),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE_SIZE, num_blocks=_num_blocks(model.config, kv_cache_bytes, model.dtype, self.context_length),
                max_batch_tokens=max_batch_tokens),
        )
        self.manager.start()
        self._router = threading.Thread(target=self._route, name="cb-router", daemon=True)
        self._router.start()
        if warmup:
            self._warm_up()

    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        prompts = list(prompts)
        if any(not p.sampling.greedy or p.sampling.seed is not None for p in prompts):
            return self._generate_fallback(prompts)
        return self._generate_batched(prompts)

    def abort(self, request_id: str) -> None:
        with self._lock:
            outputs = self._queues.get(request_id)
        if outputs is None:
            self.fallback.abort(request_id)
            return
        self.manager.cancel_request(request_id)
        outputs.put(_ABORTED)  # a cancelled request gets no output from the manager

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.manager.stop(block=True, timeout=30)
        self._router.join(timeout=5)
        self.model.destroy_cached_continuous_batching_manager()
        self.fallback.close()

    # -- batched (greedy) requests ----------------------------------------------

    def _generate_batched(self, prompts: List[Prompt]) -> Iterator[TokenEvent]:
        if self._closed.is_set():
            raise RuntimeError("the continuous batching engine is closed")
        streams = {p.request_id: _Stream(p) for p in prompts}
        with self._lock:
            for request_id, stream in streams.items():
                if request_id in self._queues:
                    raise ValueError(f"request_id {request_id!r} is already generating")
                self._queues[request_id] = stream.outputs
        try:
            for p in prompts:
                self.manager.add_request(list(p.token_ids), request_id=p.request_id,
                                         max_new_tokens=p.sampling.max_new_tokens, streaming=True)
            yield from _interleave(list(streams.values()))
        finally:
            for request_id, stream in streams.items():
                if not stream.done:  # the consumer left early
                    self.manager.cancel_request(request_id)
            with self._lock:
                for request_id in streams:
                    self._queues.pop(request_id, None)

    def _route(self) -> None:
        """Hand each output of the manager to its request's queue (one thread for all requests)."""
        while not self._closed.is_set():
            output = self.manager.get_result(timeout=0.1)
            if output is None:
                continue
            with self._lock:
                outputs = self._queues.get(output.request_id)
            if outputs is not None:
                outputs.put(output)

    def _warm_up(self) -> None:
        # The first steps allocate the cache and pick kernels; pay that before the first client.
        prompt = Prompt(token_ids=(BOS_ID, 3, 4, 5), sampling=SamplingParams(max_new_tokens=4))
        for _ in self.generate([prompt]):
            pass

    # -- sampled or seeded requests ----------------------------------------------

    def _generate_fallback(self, prompts: List[Prompt]) -> Iterator[TokenEvent]:
        with self._fallback_lock:
            yield from self.fallback.generate(prompts)


_ABORTED = object()


class _Stream:
    """One request's outputs: full token lists from the manager, turned into new-id events."""

    def __init__(self, prompt: Prompt):
        self.prompt = prompt
        self.outputs: "queue.Queue[Any]" = queue.Queue()
        self.seen = 0
        self.done = False

    def next_event(self, timeout: Optional[float]) -> Optional[TokenEvent]:
        output = self.outputs.get(timeout=timeout)
        if output is _ABORTED:
            return self._finish((), "abort")
        if output.error is not None:
            self.done = True
            raise RuntimeError(f"continuous batching failed for request {self.prompt.request_id}: {output.error}")
        tokens = list(output.generated_tokens)
        new, self.seen = tokens[self.seen:], len(tokens)
        if not output.is_finished():
            return TokenEvent(self.prompt.request_id, tuple(new)) if new else None
        if tokens and tokens[-1] == EOS_ID:
            return self._finish(tuple(new[:-1]), "eos")
        return self._finish(tuple(new), "length")

    def _finish(self, new: tuple, reason: str) -> TokenEvent:
        self.done = True
        count = self.seen - (reason == "eos")
        usage = Usage(len(self.prompt.token_ids), max(count, 0))
        return TokenEvent(self.prompt.request_id, new, reason, usage)


def _interleave(streams: List[_Stream]) -> Iterator[TokenEvent]:
    """Events of several requests as they arrive (one request: just its own, blocking)."""
    while True:
        pending = [s for s in streams if not s.done]
        if not pending:
            return
        for stream in pending:
            try:
                event = stream.next_event(timeout=None if len(pending) == 1 else 0.01)
            except queue.Empty:
                continue
            if event is not None:
                yield event


def _num_blocks(config: Any, kv_cache_bytes: int, dtype: torch.dtype, context_length: int) -> int:
    """Pages of ``PAGE_SIZE`` tokens that fit ``kv_cache_bytes`` (keys and values of every layer).

    Never more than 8 full contexts need: a small model does not take the whole budget.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return max(4, min(kv_cache_bytes // (per_token * PAGE_SIZE), 8 * context_length // PAGE_SIZE))
