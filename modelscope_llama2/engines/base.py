"""The engine interface: what every backend implements and everything above it calls.

Chat, streaming, batches, pipelines, the terminal, the server and the web app
talk to an engine only through :class:`Engine`: a list of
:class:`~modelscope_llama2.prompts.prompt.Prompt` in, a stream of
:class:`TokenEvent` out, and :meth:`Engine.abort` to cancel one request.
Prompts are always the package's Meta-exact token ids; an engine never
tokenizes a prompt itself.

Contract:

* ``generate(prompts)`` yields events for exactly those requests, in the
  order tokens are produced. Each event carries the request's *new* ids
  since its previous event (EOS never included). A request's last event has
  ``finish_reason`` (``eos``, ``length``, ``stop`` or ``abort``) and ``usage``.
  An engine failure raises in the consumer.
* Engines that push events (``submit(prompt, on_event)``) end a failed
  request with ``finish_reason='error'`` instead (the cause is logged).
* Closing the iterator early aborts the requests it has not finished.
* ``abort(request_id)`` may be called from any thread; that request ends with
  ``finish_reason='abort'``; other requests are not affected.
* Engines are safe to call from several threads at once.
"""

import abc
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterator, List, Optional, Sequence, Tuple

from ..prompts.prompt import Prompt, SamplingParams

FINISH_REASONS = ("eos", "length", "stop", "abort", "error")


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; ``cached_tokens`` were served from a prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one token under the raw logits, and the ``top`` most likely ``(id, logprob)``."""

    token_id: int
    logprob: float
    top: Tuple[Tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """New token ids of one request; the last event of a request has ``finish_reason`` and ``usage``.

    ``logprobs``: one per id of ``token_ids`` when the request asked for
    them (``SamplingParams.logprobs``). ``prompt_logprobs``: on a request's
    first event when asked for (``SamplingParams.prompt_logprobs``), one per
    prompt id, ``None`` for the first.
    """

    request_id: str
    token_ids: Tuple[int, ...] = ()
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    logprobs: Tuple[TokenLogprob, ...] = ()
    prompt_logprobs: Optional[Tuple[Optional[TokenLogprob], ...]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, later: "TokenEvent") -> "TokenEvent":
        """This event and the ``later`` one of the same request as one (a consumer that fell behind gets both at once).

        Example:
            >>> TokenEvent("r", (5,)).then(TokenEvent("r", (6,), "eos", Usage(3, 2))).token_ids
            (5, 6)
        """
        return TokenEvent(self.request_id, self.token_ids + later.token_ids, later.finish_reason, later.usage,
                          self.logprobs + later.logprobs,
                          self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs)


class EventBuffer:
    """Token events handed from producer threads to one consumer, at most one pending per request.

    A later event of a request whose previous one is still pending is merged
    into it (:meth:`TokenEvent.then`), so a consumer that falls behind costs
    one entry per request, never a queue that grows a step at a time, and
    the producer (the thread driving the model for everyone) never blocks.

    Example:
        >>> buffer = EventBuffer()
        >>> buffer.put(TokenEvent("a", (5,))); buffer.put(TokenEvent("b", (7,))); buffer.put(TokenEvent("a", (6,)))
        >>> [buffer.get().token_ids, buffer.get().token_ids, buffer.get(timeout=0)]
        [(5, 6), (7,), None]
    """

    def __init__(self) -> None:
        self._pending: "OrderedDict[str, TokenEvent]" = OrderedDict()
        self._ready = threading.Condition()

    def put(self, event: TokenEvent) -> None:
        with self._ready:
            earlier = self._pending.get(event.request_id)
            self._pending[event.request_id] = earlier.then(event) if earlier is not None else event
            self._ready.notify()

    def get(self, timeout: Optional[float] = None) -> Optional[TokenEvent]:
        """The oldest pending event (merged), or None after ``timeout`` seconds without one."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._pending, timeout):
                return None
            return self._pending.popitem(last=False)[1]


class Engine(abc.ABC):
    """A backend that turns prompt token ids into generated token ids.

    Subclasses set :attr:`name`, :attr:`context_length` and
    :attr:`sampling_options` (the transformers-style option names they honour).
    """

    name: str = "engine"
    context_length: int
    sampling_options: AbstractSet[str] = frozenset()

    def check_sampling(self, sampling: SamplingParams, where: str = "inputs") -> None:
        """Raise ``ValueError`` naming the first option this engine cannot honour (before any model work)."""
        for key in sampling.options:
            if key not in self.sampling_options:
                raise ValueError(
                    f"{where}[{key!r}]: not supported by the {self.name} engine; it supports "
                    f"{sorted(self.sampling_options)}"
                )

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        """Generate for ``prompts`` (one or several), yielding their token events."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop generating for ``request_id`` (unknown or finished ids are ignored)."""

    def close(self) -> None:
        """Release what the engine holds (processes, threads, caches)."""

    @property
    def alive(self) -> bool:
        """Whether the engine can take requests: False once it is closed or what runs it has died."""
        return True


class PushEngine(Engine):
    """An engine that pushes each request's events to a callback (:meth:`submit`); ``generate`` is built on it."""

    @abc.abstractmethod
    def submit(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        """Start generating for ``prompt``; ``on_event`` gets its events, from the engine's thread.

        The last event has ``finish_reason``; none follows it. ``on_event``
        must return quickly (it runs on the thread that drives the model).
        Bad input raises ``ValueError`` here, before any model work.
        """

    def generate(self, prompts: Sequence[Prompt]) -> Iterator[TokenEvent]:
        prompts = list(prompts)
        events = EventBuffer()  # one pending event per request: a slow consumer never grows a queue
        submitted: List[str] = []
        try:
            for prompt in prompts:  # all checked and queued now: bad input fails on the call
                self.submit(prompt, events.put)
                submitted.append(prompt.request_id)
        except BaseException:
            for request_id in submitted:
                self.abort(request_id)
            raise
        return self._events(events, set(submitted))

    def _events(self, events: EventBuffer, unfinished: set) -> Iterator[TokenEvent]:
        try:
            while unfinished:
                event = events.get()
                if event.finished:
                    unfinished.discard(event.request_id)
                if event.finish_reason == "error":
                    raise RuntimeError(f"the {self.name} engine failed request {event.request_id} (see the log)")
                yield event
        finally:
            for request_id in unfinished:  # the consumer left early
                self.abort(request_id)
