"""What the HTTP app generates through: a :class:`Backend`, local or remote.

The OpenAI app (:mod:`modelscope_llama2.serving.app`) builds Meta-exact
prompts itself (it holds the tokenizer and the context length) and hands
each :class:`~modelscope_llama2.prompts.prompt.Prompt` to a backend, which
streams :class:`~modelscope_llama2.decoding.TextDelta` items back. The
app never touches an engine: :class:`LocalBackend` wraps an
:class:`~modelscope_llama2.engines.base.Engine` in this process; a remote
backend (Ray Serve) forwards the same plain data to a replica.

Example:
    >>> issubclass(LocalBackend, Backend)
    True
"""

import abc
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from ..decoding import TextDelta, detokenizer_for, text_delta
from ..engines.base import Engine, TokenEvent
from ..prompts.prompt import Prompt, SamplingParams


class BackendUnavailable(RuntimeError):
    """The backend cannot take requests now (shutting down, replica gone): the app answers 503."""


class Backend(abc.ABC):
    """Generation as the HTTP ingress sees it: prompts in, text deltas out.

    Attributes the ingress reads to build prompts: :attr:`tokenizer` (a
    :class:`~modelscope_llama2.tokenizer.Llama2Tokenizer`),
    :attr:`context_length` and :attr:`engine_name`.
    """

    tokenizer: Any
    context_length: int
    engine_name: str

    @abc.abstractmethod
    def check_sampling(self, sampling: SamplingParams, where: str) -> None:
        """Raise ``ValueError`` naming the first option the engine cannot honour, before any model work."""

    @abc.abstractmethod
    def stream(self, prompt: Prompt) -> AsyncIterator[TextDelta]:
        """Generate for ``prompt``: its text deltas, the last with ``finish_reason`` and ``usage``.

        Closing the iterator early (``aclose()``, e.g. when the client goes
        away) aborts the request and frees its slot.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop generating for ``request_id`` (unknown or finished ids are ignored)."""

    async def close(self) -> None:
        """Release what the backend holds."""

    def register_metrics(self, registry: Any) -> None:
        """Add the backend's own metrics to the app's Prometheus ``registry`` (served on ``/metrics``); none here."""


class LocalBackend(Backend):
    """An :class:`Engine` in this process.

    An engine that pushes its events (a ``submit(prompt, on_event)`` method,
    as :class:`~modelscope_llama2.engines.batching.BatchingEngine`
    has) hands them straight to the event loop; any other engine's blocking
    ``generate()`` runs in a worker thread per request (at most
    ``max_workers`` at once). Text is decoded on the event loop either way.
    """

    def __init__(self, engine: Engine, tokenizer: Any, max_workers: int = 16):
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_length = engine.context_length
        self.engine_name = engine.name
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        self._submit = getattr(engine, "submit", None) or self._submit_in_thread

    def check_sampling(self, sampling: SamplingParams, where: str) -> None:
        self.engine.check_sampling(sampling, where)

    async def stream(self, prompt: Prompt) -> AsyncIterator[TextDelta]:
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue[Any]" = asyncio.Queue()

        def deliver(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        self._submit(prompt, deliver)
        detokenizer = detokenizer_for(prompt, self.tokenizer)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, _Failure):
                    raise event.error
                finished = event.finished
                delta = text_delta(detokenizer, event, self.engine.abort)
                if delta is not None:
                    yield delta
        finally:
            if not finished:  # the consumer left early (client gone): free the slot
                self.engine.abort(prompt.request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def _submit_in_thread(self, prompt: Prompt, on_event: Callable[[Any], None]) -> None:
        def run() -> None:
            events: Iterator[TokenEvent] = self.engine.generate([prompt])
            try:
                for event in events:
                    on_event(event)
            except Exception as error:  # handed to the consumer, which raises it in the app
                on_event(_Failure(error))
            finally:
                events.close()  # aborts the request in the engine if it did not finish

        self._executor.submit(run)


class _Failure:
    def __init__(self, error: Exception):
        self.error = error

