"""Token generation on top of transformers' ``generate()``.

transformers does the sampling, the logits processors and the KV cache; this
module adds what chat needs around it: stop strings, reproducible seeds,
finish reasons, text that is safe to show while tokens stream in, and
running ``generate()`` in a worker thread so callers can iterate over tokens.
"""

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..prompts.requests import GenerationSpec

Decode = Callable[[List[int]], str]


@dataclass
class Generated:
    """New token ids (EOS excluded) and why generation ended: ``eos``, ``stop`` or ``length``."""

    token_ids: List[int]
    finish_reason: str


class StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text contains one of ``stops``."""

    def __init__(self, stops: Sequence[str], decode: Decode, prompt_width: int):
        self.stops = tuple(stops)
        self.decode = decode
        self.prompt_width = prompt_width
        # A character can take up to 4 byte-fallback tokens; no token is
        # shorter than that, so this many tail tokens hold any match.
        self.window = 4 * max(map(len, self.stops)) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_width:][:, -self.window:].tolist()
        done = [any(stop in self.decode(tail) for stop in self.stops) for tail in tails]
        return torch.tensor(done, device=input_ids.device)


class StopOnEvent(StoppingCriteria):
    """Ends generation when a streaming consumer goes away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class TokenQueue(BaseStreamer):
    """A ``generate()`` streamer that forwards each new token id to a queue."""

    def __init__(self, sink: "queue.Queue"):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.sink.put(("token", token))

    def end(self) -> None:
        pass


def visible_text(decode: Decode, token_ids: List[int], stops: Sequence[str], final: bool) -> Tuple[str, bool]:
    """The response text for ``token_ids`` and whether a stop string cut it.

    A trailing incomplete UTF-8 character (which sentencepiece decodes as
    U+FFFD) is never shown: it may complete with the next token, and a
    response cut by its token limit ends before it. Before the final token
    (``final=False``) a tail that may be the start of a stop string is held
    back too, so every partial text is a prefix of the final one.
    """
    text = decode(token_ids)
    cuts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    text = text.rstrip("\ufffd")
    if not final:
        held = max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        text = text[: len(text) - held]
    return text, False


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


def run_generate(
    model: Any,
    input_ids: torch.LongTensor,
    spec: GenerationSpec,
    max_new_tokens: int,
    decode: Decode,
    pad_token_id: int,
    *,
    attention_mask: Optional[torch.LongTensor] = None,
    cache: Any = None,
    streamer: Optional[BaseStreamer] = None,
    cancel: Optional[threading.Event] = None,
) -> Tuple[torch.LongTensor, Any]:
    """One ``generate()`` call; returns ``(new token ids [batch, n], the KV cache)``."""
    criteria = StoppingCriteriaList()
    if spec.stop:
        criteria.append(StopOnStrings(spec.stop, decode, input_ids.shape[1]))
    if cancel is not None:
        criteria.append(StopOnEvent(cancel))
    with torch.inference_mode(), seeded(spec.seed, input_ids.device):
        out = model.generate(
            input_ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            max_length=None,  # max_new_tokens rules; silences generate()'s warning about both
            pad_token_id=pad_token_id,
            stopping_criteria=criteria,
            streamer=streamer,
            cache=cache,
            return_dict_in_generate=True,
            **spec.generate_kwargs,
        )
    return out.sequences[:, input_ids.shape[1]:], out.get("cache")


def finish(new_ids: List[int], eos_id: int, limit: int) -> Generated:
    """Trim one row of ``generate()`` output to its EOS and its own token limit.

    Rows of a batch share one ``max_new_tokens``; each keeps only its own share.
    """
    ids = new_ids[:limit]
    if eos_id in ids:
        return Generated(ids[: ids.index(eos_id)], "eos")
    return Generated(ids, "length")


def iterate_in_thread(run: Callable[[BaseStreamer, threading.Event], Any]) -> Iterator[Tuple[str, Any]]:
    """Run ``run(streamer, cancel)`` in a worker thread, yielding ``('token', id)`` then ``('done', result)``.

    Closing the iterator early sets ``cancel`` (generation stops at the next
    token) and waits for the worker, so no generation outlives its consumer.
    """
    sink: "queue.Queue" = queue.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            sink.put(("done", run(TokenQueue(sink), cancel)))
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
        cancel.set()
        worker.join()
