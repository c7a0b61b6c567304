"""The batching engine: every request, greedy or sampled, in the same forward passes.

A background thread owns the model and runs a step loop (the gpt-fast /
vLLM-v1 shape, without transformers' batching manager):

* **Admission**: a request takes a KV slot (:class:`~.kv.SlotCache`). The slot
  whose ids share the longest prefix with the prompt gives its KV: an idle
  slot left by the same conversation's previous turn is taken as it is; a
  prefix shared with another slot (same system prompt, an edited history)
  is copied into the least recently used free slot. ``cached_tokens`` in
  the usage says how many prompt tokens were reused.
* **Step**: one forward pass (:mod:`.forward`) of the waiting prompts'
  chunks (up to ``max_batch_tokens`` ids) and every decoding request's next
  id, packed into one sequence without padding; each row attends over its
  own slot at its own positions, so a request arriving while others decode
  costs them no forward pass of its own.
* **Sampling**: per row (:mod:`.sampler`): each request's own settings and
  ``torch.Generator``, logprobs, grammar masks. Greedy rows give what
  ``generate()`` gives.
* **Priority**: background prefills (``Prompt.background``: a cache warm-up
  nobody waits for) are admitted after the other requests and prefill only
  in steps where none of those does, a short chunk at a time.
* **Cancellation**: :meth:`BatchingEngine.abort` ends the request at once
  (its last event comes from the caller's thread) and its slot is free
  before the next forward pass.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = BatchingEngine(AutoModelForCausalLM.from_pretrained(DEMO_DIR), max_batch_size=4)
    >>> greedy = Prompt(token_ids=(1, 3, 4), sampling=SamplingParams(max_new_tokens=3, options={"do_sample": False}))
    >>> seeded = Prompt(token_ids=(1, 3, 4), sampling=SamplingParams(
    ...     max_new_tokens=3, seed=7, ignore_eos=True, options={"do_sample": True, "temperature": 0.8}))
    >>> finals = [e for e in engine.generate([greedy, seeded]) if e.finished]
    >>> sorted((e.finish_reason, e.usage.prompt_tokens) for e in finals)
    [('length', 3), ('length', 3)]
    >>> engine.close()
"""

import contextlib
import logging
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from ...constants import BOS_ID, CONTEXT_LENGTH, EOS_ID
from ...prompts.prompt import Prompt, SamplingParams
from ..base import PushEngine, TokenEvent, TokenLogprob, Usage
from ..logits import raw_logprobs, token_logprob
from ..prefix_cache import common_prefix_length
from ..transformers_engine import check_token_ids
from .forward import PackedModel, PackedStep
from .kv import SlotCache, bytes_per_token
from .sampler import CHECKPOINT_DEFAULTS, ROW_OPTIONS, RowSampling, row_sampling, sample
from .threads import ThreadChooser

logger = logging.getLogger(__name__)

# Slots (running and idle, kept for later turns): 4 per batch row, at least 32 conversations, as
# kv_cache_bytes allows.
SLOTS_PER_BATCH_ROW = 4
MIN_SLOTS = 32
# Shorter shared prefixes (BOS and "[INST]" of any two chats) are prefilled again rather than copied: what
# vLLM's and transformers' block-level caches do with their 16- and 32-token blocks.
MIN_REUSED_TOKENS = 16
CPU_KV_CACHE_BYTES = 2 << 30
# Ids of background prefills (Prompt.background) per forward pass: a request arriving while one runs waits for
# a short step, not for the whole prefill (on a CPU a 166M model's forward costs ~30 ms + ~2.6 ms per id).
BACKGROUND_CHUNK_TOKENS = 32


class BatchingEngine(PushEngine):
    """Continuous batching with per-request sampling over a transformers causal LM.

    ``max_batch_size``: requests generating at once (more wait in a queue).
    ``kv_cache_bytes``: memory for the KV slots, running and idle (default:
    90% of the free memory on a GPU, 2 GiB on a CPU); what is left after
    the running requests keeps earlier turns for reuse, evicted least
    recently used. ``max_model_len``: tokens per slot (default: the model's
    context). ``max_batch_tokens``: prompt tokens per prefill forward.
    """

    name = "transformers-batching"
    sampling_options = ROW_OPTIONS

    def __init__(self, model: Any, max_batch_size: int = 16, kv_cache_bytes: Optional[int] = None,
                 max_model_len: Optional[int] = None, max_batch_tokens: int = 512):
        self.model = model
        self.context_length = max_model_len or getattr(model.config, "max_position_embeddings", CONTEXT_LENGTH)
        self.max_batch_tokens = max_batch_tokens
        self._input_device = _input_device(model)
        # On a CPU, each kind of step runs on one thread or all, whichever its timings say is faster.
        self._threads = ThreadChooser(torch.get_num_threads()) if self._input_device.type == "cpu" else None
        self._defaults = _checkpoint_defaults(model)
        self._packed = PackedModel(model)
        per_slot = bytes_per_token(model.config, model.dtype) * self.context_length
        budget = kv_cache_bytes if kv_cache_bytes is not None else _default_kv_bytes(self._input_device)
        slots = min(max(1, budget // per_slot), max(max_batch_size * SLOTS_PER_BATCH_ROW, MIN_SLOTS))
        self.max_batch_size = min(max_batch_size, slots)
        self.kv = SlotCache(model.config, slots, self.context_length, model.dtype, self._packed.devices)
        self._history = torch.zeros(slots, self.context_length, dtype=torch.long, device=self._input_device)
        self._slot_ids: List[List[int]] = [[] for _ in range(slots)]  # ids whose KV each slot holds
        self._slot_prompt_len = [0] * slots
        self._owner: List[Optional[_Request]] = [None] * slots
        self._last_used = [0] * slots
        self._tick = 0
        self._requests: Dict[str, _Request] = {}
        self._inbox: List[_Request] = []
        self._waiting: List[_Request] = []
        self._running: List[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()
        self._warm_up()

    # -- the Engine interface ---------------------------------------------------

    def check_sampling(self, sampling: SamplingParams, where: str = "inputs") -> None:
        super().check_sampling(sampling, where)
        if sampling.structured is not None:  # compiled now (cached), so a bad schema fails before any model work
            self._grammars().compile(sampling.structured, f"{where}['response_format']")

    def _grammars(self) -> Any:
        # Imported here: xgrammar is only needed by requests that ask for structured output.
        from ..structured import grammar_compiler

        return grammar_compiler(self.model)

    def submit(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        check_token_ids([prompt], self.model.config.vocab_size)
        self.check_sampling(prompt.sampling)
        if len(prompt.token_ids) >= self.context_length:
            raise ValueError(f"token_ids: {len(prompt.token_ids)} prompt tokens leave no room to generate in "
                             f"the {self.context_length}-token context")
        row = row_sampling(prompt.sampling, self._defaults, self._logits_device())
        if prompt.sampling.structured is not None:
            row.constraint = self._grammars().request_grammar(prompt.sampling.structured)
        request = _Request(prompt, on_event, row)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batching engine is closed")
            if prompt.request_id in self._requests:
                raise ValueError(f"request_id {prompt.request_id!r} is already generating")
            self._requests[prompt.request_id] = request
            self._inbox.append(request)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            request = self._requests.get(request_id)
        if request is not None:
            request.finish("abort")
            with self._cond:
                self._cond.notify()  # the loop frees its slot before the next forward pass

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for request in list(self._requests.values()):
            request.finish("abort")

    @property
    def running(self) -> int:
        """Requests the engine holds (queued or in a slot); an aborted one is let go before the next forward."""
        with self._cond:
            return len(self._requests)

    # -- the step loop (engine thread only) --------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._inbox or self._waiting or self._running):
                    self._cond.wait()
                if self._closed:
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            self._retire_finished()
            self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception:  # a failed forward ends the requests in it, not the engine
                logger.exception("batching step failed; failing %d requests", len(self._running))
                for request in self._running:
                    request.finish("error")
            self._retire_finished()

    def _retire_finished(self) -> None:
        for request in [r for r in self._running if r.done]:
            self._running.remove(request)
            self._owner[request.slot] = None
            self._tick += 1
            self._last_used[request.slot] = self._tick
        self._waiting = [r for r in self._waiting if not r.done]
        with self._cond:
            for request in [r for r in self._requests.values() if r.done]:
                del self._requests[request.prompt.request_id]

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            # Someone waits for every request but a background prefill: those first, each in arrival order.
            request = self._waiting.pop(next((i for i, r in enumerate(self._waiting) if not r.prompt.background), 0))
            ids = list(request.prompt.token_ids)
            # Prompt logprobs need every prompt position's logits: no reused KV for them.
            slot, cached = self._take_slot(ids, reuse=request.scored is None)
            request.slot, request.length, request.cached = slot, cached, cached
            request.feed = ids[cached:]
            self._owner[slot] = request
            self._slot_ids[slot] = ids[:cached]
            self._slot_prompt_len[slot] = len(ids)
            self._history[slot, :len(ids)] = torch.tensor(ids, device=self._history.device)
            self._running.append(request)

    def _take_slot(self, ids: List[int], reuse: bool = True) -> "tuple[int, int]":
        """A free slot for a prompt and how many of its ids already have KV there (at least one id is left)."""
        best, shared = -1, 0
        for slot, held in enumerate(self._slot_ids if reuse else ()):
            n = common_prefix_length(held, ids)
            if n > shared:
                best, shared = slot, n
        usable = min(shared, len(ids) - 1)
        if usable < MIN_REUSED_TOKENS:
            usable = 0
        free = [slot for slot in range(self.kv.slots) if self._owner[slot] is None]
        # The conversation's own earlier turn: take its slot as it is.
        if usable and self._owner[best] is None and usable >= self._slot_prompt_len[best]:
            return best, usable
        # Otherwise the least recently used free slot (never used ones first), with any shared prefix copied in.
        target = min(free, key=lambda slot: (bool(self._slot_ids[slot]), self._last_used[slot]))
        if usable > 0 and best != target:
            self.kv.copy_prefix(best, target, usable)
        return target, usable

    def _step(self) -> None:
        prefilling = [r for r in self._running if len(r.feed) > 1 and not r.done]
        group, counts = self._prefill_group(prefilling)
        if group and group[0].scored is not None:  # every position's logits: alone
            with self._threads_for(counts[0], decode=False):
                self._forward(group, counts)
            group, counts = [], []
        # Prompt chunks and every decoding row's next id in one forward pass.
        decoding = [r for r in self._running if len(r.feed) == 1 and not r.done]
        if group or decoding:
            with self._threads_for(sum(counts) + len(decoding), decode=not group):
                self._forward(group + decoding, counts + [1] * len(decoding))

    def _threads_for(self, tokens: int, decode: bool) -> Any:
        return self._threads.step(tokens, decode) if self._threads is not None else contextlib.nullcontext()

    def _prefill_group(self, prefilling: List["_Request"]) -> "tuple[List[_Request], List[int]]":
        """Prompt chunks of the next forward pass and their lengths: up to ``max_batch_tokens`` ids in all.

        Prompts go in arrival order, the last one cut where the budget ends
        (its rest goes in the next step). A request scoring its prompt (prompt
        logprobs) is prefilled alone. Background prefills only when no other
        prompt is left to prefill, :data:`BACKGROUND_CHUNK_TOKENS` ids a step.
        """
        group: List[_Request] = []
        counts: List[int] = []
        left = max(2, self.max_batch_tokens)
        waited_for = [r for r in prefilling if not r.prompt.background]
        if len(waited_for) < len(prefilling):
            prefilling, left = (waited_for, left) if waited_for else (prefilling, min(left, BACKGROUND_CHUNK_TOKENS))
        for request in prefilling:
            if left < 2 or (group and group[0].scored is not None):
                break
            if group and request.scored is not None:
                continue
            counts.append(min(len(request.feed), left))
            group.append(request)
            left -= counts[-1]
        return group, counts

    def _forward(self, requests: List["_Request"], counts: List[int]) -> None:
        """Feed ``counts[i]`` ids of request ``i`` (prompt chunks first, then rows feeding one id), packed into one
        sequence; requests whose feed is then empty get their next token."""
        step = PackedStep([(r.slot, r.length, r.feed[:n]) for r, n in zip(requests, counts)], self.kv,
                          self._input_device, self._packed.dtype)
        if any(r.params.needs_history for r in requests):  # the ids so far, for penalties
            self._history[step.slots, step.position_ids[0]] = step.input_ids[0]
        hidden = self._packed.hidden(self.kv, step)
        head = self._packed.head
        scoring = requests[0] if requests[0].scored is not None else None  # then alone (see _prefill_group)
        if scoring is not None:  # a request scoring its prompt keeps every position's logits
            logits = head(hidden[0])
            scoring.score(logits, scoring.length)
            logits = logits[step.last]
        else:  # each row's last id predicts its next token
            logits = head(hidden[0, step.last])
        for request, n in zip(requests, counts):
            self._slot_ids[request.slot].extend(request.feed[:n])
            request.length += n
            request.feed = request.feed[n:]
        ready = [i for i, r in enumerate(requests) if not r.feed]
        if ready:
            self._sample([requests[i] for i in ready], logits[ready] if len(ready) < len(requests) else logits)

    def _sample(self, requests: List["_Request"], logits: torch.Tensor) -> None:
        histories = [(self._history[r.slot, :r.length], len(r.prompt.token_ids)) if r.params.needs_history else None
                     for r in requests]
        tokens, logprobs = sample(logits, [r.params for r in requests], histories, [r.count for r in requests])
        events = [request.take(token, logprob, room=request.length < self.context_length)
                  for request, token, logprob in zip(requests, tokens, logprobs)]
        # Every row's event once the step's tokens are all taken: consumers woken in one burst, not one
        # wake-up (and GIL hand-over) between each row's bookkeeping.
        for request, event in zip(requests, events):
            if event is not None:
                request.deliver(event)

    def _warm_up(self) -> None:
        # The first forward passes pick kernels and touch the weights; pay that before the first client.
        prompt = Prompt(token_ids=(BOS_ID, 3, 4, 5), sampling=SamplingParams(max_new_tokens=2,
                                                                              options={"do_sample": False}))
        for _ in self.generate([prompt]):
            pass

    def _logits_device(self) -> torch.device:
        return self._packed.head.weight.device


class _Request:
    """One request in the engine: its slot, what it still has to feed, its count; finished exactly once."""

    def __init__(self, prompt: Prompt, on_event: Callable[[TokenEvent], None], params: RowSampling):
        self.prompt, self.on_event, self.params = prompt, on_event, params
        self.slot = -1
        self.length = 0  # ids whose KV is in the slot
        self.feed: List[int] = []  # ids to feed next: the uncached prompt, then the last token
        self.count = self.cached = 0
        self.done = False
        self._lock = threading.RLock()  # abort (any thread) and tokens (the engine thread) race
        # Prompt logprobs so far (None for the first token), until the first event carries them.
        self.scored: Optional[List[Optional[TokenLogprob]]] = None if prompt.sampling.prompt_logprobs is None \
            else [None]

    def score(self, logits: torch.Tensor, start: int) -> None:
        """Prompt logprobs from a prefill chunk's ``[q, vocab]`` logits; row j (position ``start + j``) predicts
        the next prompt id."""
        ids, k = self.prompt.token_ids, self.prompt.sampling.prompt_logprobs
        rows = raw_logprobs(logits[:max(0, len(ids) - 1 - start)])
        self.scored += [token_logprob(row, ids[start + j + 1], k) for j, row in enumerate(rows)]

    def _event(self, token_ids: tuple, reason: Optional[str] = None, usage: Optional[Usage] = None,
               logprobs: tuple = ()) -> TokenEvent:
        scored, self.scored = self.scored, None
        return TokenEvent(self.prompt.request_id, token_ids, reason, usage, logprobs=logprobs,
                          prompt_logprobs=tuple(scored) if scored is not None else None)

    def take(self, token: int, logprob: Optional[TokenLogprob], room: bool) -> Optional[TokenEvent]:
        """Count the sampled ``token``; the event to :meth:`deliver` for it (None when already finished)."""
        with self._lock:
            if self.done:
                return None
            if self.prompt.sampling.max_new_tokens == 0:  # scoring the prompt only
                return self.finish("length", deliver=False)
            if token == EOS_ID and not self.params.ignore_eos:
                return self.finish("eos", deliver=False)
            self.count += 1
            self.feed = [token]
            logprobs = (logprob,) if logprob is not None else ()
            if self.count >= self.prompt.sampling.max_new_tokens or not room:
                return self.finish("length", (token,), logprobs, deliver=False)
            return self._event((token,), logprobs=logprobs)

    def deliver(self, event: TokenEvent) -> None:
        """Hand ``event`` (from :meth:`take`) to the consumer, unless an abort ended the request since."""
        with self._lock:
            if event.finished or not self.done:
                self.on_event(event)

    def finish(self, reason: str, token_ids: tuple = (), logprobs: tuple = (),
               deliver: bool = True) -> Optional[TokenEvent]:
        """End the request (once): its last event, handed to the consumer now or (``deliver=False``) returned."""
        with self._lock:
            if self.done:
                return None
            self.done = True
            usage = Usage(len(self.prompt.token_ids), self.count, self.cached)
            event = self._event(token_ids, reason, usage, logprobs)
            if not deliver:
                return event
            self.on_event(event)
            return None


def _checkpoint_defaults(model: Any) -> Dict[str, Any]:
    config = getattr(model, "generation_config", None)
    return {key: getattr(config, key, None) for key in CHECKPOINT_DEFAULTS} if config is not None else {}


def _input_device(model: Any) -> torch.device:
    # With a device_map the embedding may sit anywhere; inputs go where it is.
    device = model.get_input_embeddings().weight.device
    return model.device if device.type == "meta" else device


def _default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return CPU_KV_CACHE_BYTES
