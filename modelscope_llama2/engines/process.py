"""An engine in a child process: the server's event loop and the step loop stop sharing one GIL.

In one process, the thread driving the model and the event loop serving
HTTP take turns holding the interpreter lock: measured under 8 streaming
clients on 2 cores, the server used 0.9 of its 2 cores, the engine's thread
waiting for the lock while the loop wrote chunks and the other way round.
:class:`ProcessEngine` builds the engine in a spawned child (with
:func:`~.factory.load_engine`, or any module-level loader: a Ray replica's
loads through ModelScope's ``Model.from_pretrained``) and talks to it over
two pipes, as vLLM's front end talks to its engine core:

* to the child: ``("submit", prompt)``, ``("abort", request_id)``,
  ``("check", call, sampling, where)``, ``("close",)``; a prompt is plain
  data (token ids and sampling settings), so it crosses as it is;
* to the parent: lists of :class:`~.base.TokenEvent` (everything the step
  produced while the last list was being sent, in one write) and replies.

The parent checks what it can before anything crosses (ids in the
vocabulary, the context, sampling options); a structured-output schema is
compiled in the child, on a ``check`` call, so a bad one still fails before
any model work. The parent never loads the weights.

If the child dies, every request in it ends with ``finish_reason='error'``
and later submits raise ``RuntimeError``. The child ignores SIGINT and
SIGTERM (a Ctrl-C or a service manager signals the whole group): it ends
when the parent closes it, after the parent's drain, or when the parent is
gone (its command pipe closes).

Example:
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.engines.factory import load_engine
    >>> from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    >>> engine = ProcessEngine(load_engine, DEMO_DIR, max_batch_size=2)
    >>> engine.name
    'transformers-batching'
    >>> prompt = Prompt(token_ids=(1, 3, 4), sampling=SamplingParams(max_new_tokens=3, options={"do_sample": False}))
    >>> [e.finish_reason for e in engine.generate([prompt])][-1], engine.running
    ('length', 0)
    >>> engine.close()
"""

import gc
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..prompts.prompt import Prompt, SamplingParams
from .base import PushEngine, TokenEvent
from .transformers_engine import check_token_ids

logger = logging.getLogger(__name__)

# Seconds the parent waits for the child to finish its requests and exit once asked to close.
CLOSE_SECONDS = 30.0


class ProcessEngine(PushEngine):
    """The engine ``load(*args, **kwargs)`` returns, run in a spawned child process.

    ``load`` is a module-level function (the child imports it by name) and
    its arguments plain data. The constructor returns once the child has
    loaded (and warmed up) the engine; a child that fails to raises
    ``RuntimeError`` with its error.
    """

    def __init__(self, load: Callable[..., Any], *args: Any, **kwargs: Any):
        context = multiprocessing.get_context("spawn")  # fork would copy the parent's threads' locks mid-use
        child_commands, self._commands = context.Pipe(duplex=False)  # (reading end, writing end)
        self._replies, child_replies = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_child_main, args=(child_commands, child_replies, load, args, kwargs), name="engine", daemon=True)
        self._process.start()
        child_commands.close()  # the child's ends: held by the child alone, so its exit closes the pipes
        child_replies.close()
        info = self._ready()
        self.name, self.context_length, self.sampling_options = info["name"], info["context_length"], \
            info["sampling_options"]
        self.max_batch_size = info.get("max_batch_size")
        self._vocab_size = info["vocab_size"]
        self._lock = threading.Lock()  # callbacks, calls, and one writer at a time on the command pipe
        self._callbacks: Dict[str, Callable[[TokenEvent], None]] = {}
        self._calls: Dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._ended: Optional[str] = None  # why no request can start any more
        self._closing = False
        self._receiver = threading.Thread(target=self._receive, name="engine-events", daemon=True)
        self._receiver.start()

    def _ready(self) -> Dict[str, Any]:
        while not self._replies.poll(1.0):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) while loading")
        try:
            kind, payload = self._replies.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) while loading") from None
        if kind != "ready":
            self._process.join()
            raise RuntimeError(f"the engine process failed to load the engine: {payload}")
        return payload

    # -- the Engine interface ---------------------------------------------------

    def check_sampling(self, sampling: SamplingParams, where: str = "inputs") -> None:
        super().check_sampling(sampling, where)
        if sampling.structured is not None:  # the grammar is compiled (and cached) where it will be used
            self._call("check", sampling, where)

    def submit(self, prompt: Prompt, on_event: Callable[[TokenEvent], None]) -> None:
        if self._vocab_size is not None:
            check_token_ids([prompt], self._vocab_size)
        self.check_sampling(prompt.sampling)
        if len(prompt.token_ids) >= self.context_length:
            raise ValueError(f"token_ids: {len(prompt.token_ids)} prompt tokens leave no room to generate in "
                             f"the {self.context_length}-token context")
        with self._lock:
            if self._ended is not None:
                raise RuntimeError(self._ended)
            if prompt.request_id in self._callbacks:
                raise ValueError(f"request_id {prompt.request_id!r} is already generating")
            self._callbacks[prompt.request_id] = on_event
            self._commands.send(("submit", prompt))

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._callbacks and self._ended is None:
                self._commands.send(("abort", request_id))

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._ended is None:
                self._ended = "the engine is closed"
                self._commands.send(("close",))
        self._process.join(CLOSE_SECONDS)
        if self._process.is_alive():
            logger.warning("the engine process did not exit in %.0f s: killed", CLOSE_SECONDS)
            self._process.kill()
            self._process.join()
        self._receiver.join(CLOSE_SECONDS)
        self._commands.close()

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._ended is None

    @property
    def running(self) -> int:
        """Requests started and not finished yet."""
        with self._lock:
            return len(self._callbacks)

    # -- the parent's side of the pipes ----------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        """Run ``method`` in the child and wait for its answer; its ``ValueError`` is raised here."""
        future: Future = Future()
        with self._lock:
            if self._ended is not None:
                raise RuntimeError(self._ended)
            call = next(self._call_ids)
            self._calls[call] = future
            self._commands.send((method, call, *args))
        return future.result()

    def _receive(self) -> None:
        """The receiver thread: hands each event to its request's callback, each reply to its caller."""
        try:
            while True:
                for message in self._replies.recv():
                    if isinstance(message, TokenEvent):
                        self._dispatch(message)
                    else:
                        self._answer(*message)
        except (EOFError, OSError):  # the child exited: closed, or died
            pass
        self._end_everything()

    def _dispatch(self, event: TokenEvent) -> None:
        with self._lock:
            callback = self._callbacks.pop(event.request_id) if event.finished else \
                self._callbacks.get(event.request_id)
        if callback is None:
            return
        try:
            callback(event)
        except Exception:  # one consumer's fault: the thread goes on delivering everyone else's events
            logger.exception("the consumer of request %s failed on its event", event.request_id)

    def _answer(self, call: int, error: Optional[str]) -> None:
        with self._lock:
            future = self._calls.pop(call)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(ValueError(error))

    def _end_everything(self) -> None:
        self._process.join(CLOSE_SECONDS)  # its pipe closed as it exited: its exit code is a moment away
        with self._lock:
            closing = self._closing
            if self._ended is None:
                self._ended = f"the engine process exited (code {self._process.exitcode})"
            callbacks, self._callbacks = self._callbacks, {}
            calls, self._calls = self._calls, {}
        if not closing:
            logger.error("%s; failing its %d requests", self._ended, len(callbacks))
        for request_id, callback in callbacks.items():
            callback(TokenEvent(request_id, finish_reason="abort" if closing else "error"))
        for future in calls.values():
            future.set_exception(RuntimeError(self._ended))


# -- the child ------------------------------------------------------------------


def _child_main(commands: Any, replies: Any, load: Callable[..., Any], args: Tuple[Any, ...],
                kwargs: Dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the engine stops (after its drain)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     [engine] %(message)s")
    try:
        engine = load(*args, **kwargs)
    except Exception as error:  # the parent raises it
        logger.exception("loading the engine failed")
        replies.send(("failed", f"{type(error).__name__}: {error}"))
        return
    replies.send(("ready", {
        "name": engine.name, "context_length": engine.context_length, "sampling_options": engine.sampling_options,
        "max_batch_size": getattr(engine, "max_batch_size", None), "vocab_size": _vocab_size(engine)}))
    # Loaded for good: the collector never walks the model's objects again (a full pass stalls a step).
    gc.freeze()
    outbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    sender = threading.Thread(target=_send_batches, args=(outbox, replies), name="engine-replies", daemon=True)
    sender.start()
    try:
        _serve_commands(engine, commands, outbox)
    finally:
        engine.close()  # every request left ends with 'abort', and is sent
        outbox.put(None)
        sender.join()


def _vocab_size(engine: Any) -> Optional[int]:
    model = getattr(engine, "model", None)  # a transformers model's; other engines check ids themselves
    return model.config.vocab_size if model is not None else None


def _serve_commands(engine: Any, commands: Any, outbox: "queue.SimpleQueue[Any]") -> None:
    while True:
        try:
            command, *args = commands.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if command == "close":
            return
        if command == "abort":
            engine.abort(args[0])
        elif command == "check":
            call, sampling, where = args
            try:
                engine.check_sampling(sampling, where)
                outbox.put((call, None))
            except ValueError as error:
                outbox.put((call, str(error)))
        else:
            _submit(engine, args[0], outbox)


def _submit(engine: Any, prompt: Prompt, outbox: "queue.SimpleQueue[Any]") -> None:
    try:
        engine.submit(prompt, outbox.put)
    except Exception:  # the parent checked it: a failure here is the engine's, and ends only this request
        logger.exception("submitting request %s failed", prompt.request_id)
        outbox.put(TokenEvent(prompt.request_id, finish_reason="error"))


def _send_batches(outbox: "queue.SimpleQueue[Any]", replies: Any) -> None:
    """Everything put since the last write goes in one write: a step's events (one per row) cross together."""
    while True:
        batch: List[Any] = [outbox.get()]
        while True:
            try:
                batch.append(outbox.get_nowait())
            except queue.Empty:
                break
        last = batch[-1] is None
        batch = [message for message in batch if message is not None]
        if batch:
            try:
                replies.send(batch)
            except (BrokenPipeError, OSError):  # the parent is gone
                return
        if last:
            return
