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
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional

from ..decoding import StreamingDetokenizer, TextDelta, detokenizer_for, text_delta
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
    def stream(self, prompt: Prompt, whole: bool = False) -> AsyncIterator[TextDelta]:
        """Generate for ``prompt``: its text deltas, the last with ``finish_reason`` and ``usage``.

        Closing the iterator early (``aclose()``, e.g. when the client goes
        away) aborts the request and frees its slot. ``whole``: the caller
        answers only once the text is complete (not streamed to a client),
        so a backend may start the request over elsewhere at any point.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop generating for ``request_id`` (unknown or finished ids are ignored)."""

    async def close(self) -> None:
        """Release what the backend holds."""

    @property
    def alive(self) -> bool:
        """Whether the backend can generate at all (``/health`` answers 503 otherwise); replicas come and go."""
        return True

    def register_metrics(self, registry: Any) -> None:
        """Add the backend's own metrics to the app's Prometheus ``registry`` (served on ``/metrics``); none here."""


class EngineFailed(RuntimeError):
    """The engine failed a request while generating it (the cause is in the server's log): the app answers 500."""


class LocalBackend(Backend):
    """An :class:`Engine` in this process.

    An engine that pushes its events (a ``submit(prompt, on_event)`` method,
    as :class:`~modelscope_llama2.engines.batching.BatchingEngine`
    has) is handed a callback; any other engine's blocking ``generate()``
    runs in a worker thread per request (at most ``max_workers`` at once).
    Either way the text is decoded and stop strings matched on that thread,
    never on the event loop, which only wakes once per batch of deltas.
    """

    def __init__(self, engine: Engine, tokenizer: Any, max_workers: int = 16):
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_length = engine.context_length
        self.engine_name = engine.name
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        self._submit = getattr(engine, "submit", None) or self._submit_in_thread
        self._wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker]" = weakref.WeakKeyDictionary()

    def _waker(self, loop: asyncio.AbstractEventLoop) -> "_Waker":
        waker = self._wakers.get(loop)
        if waker is None:
            waker = self._wakers[loop] = _Waker(loop)
        return waker

    def check_sampling(self, sampling: SamplingParams, where: str) -> None:
        self.engine.check_sampling(sampling, where)

    async def stream(self, prompt: Prompt, whole: bool = False) -> AsyncIterator[TextDelta]:
        if not self.engine.alive:
            raise BackendUnavailable(f"the {self.engine_name} engine has stopped; see the server's log")
        mailbox = _Mailbox(self._waker(asyncio.get_running_loop()))
        detokenizer: List[StreamingDetokenizer] = []  # built on the engine's thread (long stops take a while)

        def deliver(event: Any) -> None:  # on the engine's thread
            try:
                if isinstance(event, _Failure):
                    mailbox.put(event)
                    return
                if not detokenizer:
                    detokenizer.append(detokenizer_for(prompt, self.tokenizer))
                stopped: List[str] = []
                delta = text_delta(detokenizer[0], event, stopped.append)
                if delta is not None:
                    mailbox.put(delta)
                for request_id in stopped:  # after the delta: the engine's last event comes from abort()
                    self.engine.abort(request_id)
            except Exception as error:  # handed to the consumer, which raises it in the app
                mailbox.put(_Failure(error))

        self._submit(prompt, deliver)
        finished = False
        try:
            while not finished:
                for item in await mailbox.get():
                    if isinstance(item, _Failure):
                        raise item.error
                    finished = item.finish_reason is not None
                    _check_finish(item)
                    yield item
        finally:
            if not finished:  # the consumer left early (client gone): free the slot
                self.engine.abort(prompt.request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    @property
    def alive(self) -> bool:
        return self.engine.alive

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Off the loop: an engine in a child process is joined (up to ProcessEngine's CLOSE_SECONDS).
        await asyncio.to_thread(self.engine.close)

    def _submit_in_thread(self, prompt: Prompt, on_event: Callable[[Any], None]) -> None:
        def run() -> None:
            events: Optional[Iterator[TokenEvent]] = None
            try:
                events = self.engine.generate([prompt])
                for event in events:
                    on_event(event)
            except Exception as error:  # handed to the consumer, which raises it in the app
                on_event(_Failure(error))
            finally:
                if events is not None:
                    events.close()  # aborts the request in the engine if it did not finish

        self._executor.submit(run)


def _check_finish(delta: TextDelta) -> None:
    """Raise for a request the engine ended on its own: only OpenAI's finish reasons go further."""
    if delta.finish_reason == "error":
        raise EngineFailed(f"the engine failed request {delta.request_id}")
    if delta.finish_reason == "abort":  # not asked for by this consumer: the engine is shutting down
        raise BackendUnavailable("the engine stopped while generating this answer")


class _Failure:
    def __init__(self, error: Exception):
        self.error = error


class _Waker:
    """Wakes an event loop's consumers: one loop callback for every mailbox filled since the last one.

    The engine hands a step's events out in one burst (one per row); each
    ``call_soon_threadsafe`` writes to the loop's self-pipe, so waking per
    mailbox would cost a system call and a GIL hand-over per row and token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: List["_Mailbox"] = []

    def wake(self, mailbox: "_Mailbox") -> None:
        with self._lock:
            self._pending.append(mailbox)
            if len(self._pending) > 1:  # a callback is already scheduled and will take this one too
                return
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _run(self) -> None:  # on the event loop
        with self._lock:
            pending, self._pending = self._pending, []
        for mailbox in pending:
            mailbox.woken.set()


class _Mailbox:
    """A request's deltas from the engine's thread to its consumer on the event loop.

    Deltas that arrive while the consumer is busy are merged into one
    (:meth:`~modelscope_llama2.decoding.TextDelta.then`): memory per request
    is bounded and the loop is woken once per batch, not once per token.
    """

    def __init__(self, waker: _Waker):
        self._waker = waker
        self._lock = threading.Lock()
        self._items: List[Any] = []
        self.woken = asyncio.Event()
        self._scheduled = False

    def put(self, item: Any) -> None:
        with self._lock:
            if self._items and isinstance(item, TextDelta) and isinstance(self._items[-1], TextDelta):
                self._items[-1] = self._items[-1].then(item)
            else:
                self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._waker.wake(self)

    async def get(self) -> List[Any]:
        await self.woken.wait()
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            self.woken.clear()
        return items
