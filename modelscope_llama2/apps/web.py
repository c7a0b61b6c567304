"""The web chat behind ``python -m modelscope_llama2 web``: a Gradio page, as a ModelScope Studio app has.

The answers come from one of two backends:

* in this process (the default): the checkpoint (``--model``; without it the
  offline demo checkpoint) is loaded with ``Model.from_pretrained`` and
  answers through ``model.stream_chat`` (:class:`LocalBackend`);
* ``--api-base URL``: a running ``python -m modelscope_llama2 serve``, through
  the ``openai`` SDK (:class:`OpenAIBackend`).

Each browser tab is its own conversation, kept in the page itself. The
page shows exactly what the next prompt is built from: the system prompt box
and the rounds in the chat, edits and retries included. When the oldest
rounds do not fit in the context with room for the answer, they are left
out of the prompt (in this process a note under the chat says how many;
``serve`` drops them too but does not report the count).

The conversation logic (:class:`Conversation`, :func:`respond`, :func:`rewind`,
:func:`edit`) is plain Python, apart from the Gradio layout (:func:`build_demo`)::

    >>> conversation = Conversation(rounds=(("Hi!", "Hello!"),), pending="Where is the capital of Zhejiang?")
    >>> [message["content"]["text"] for message in chatbot_messages(conversation)]
    ['Hi!', 'Hello!', 'Where is the capital of Zhejiang?']
"""

import logging
import os
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

from ..constants import API_KEY_ENV, CONTEXT_LENGTH
from ..engines.base import Usage
from ..engines.factory import serving_engine
from ..prompts.chat_format import dialog_from_history
from .terminal import DEMO_NOTICE, load_pipeline, resolve_model_dir

Round = Tuple[str, str]

# When the checkpoint's generation config sets no max_new_tokens: long enough
# for a chat answer, short enough to leave most of the context for history.
DEFAULT_MAX_NEW_TOKENS = 1024
# The server batches requests itself; the page only caps its own threads.
API_CONCURRENCY = 16
# A short answer streams to the page token by token; past this many updates, at most one update per
# UPDATE_INTERVAL_S: the browser re-renders the answer on each, and a fast model's token-per-update
# stream kept it so busy that a click on Stop waited for the answer's end.
UNTHROTTLED_UPDATES = 16
UPDATE_INTERVAL_S = 0.05
INSTALL_HINT = "the web chat needs gradio and openai: pip install 'modelscope_llama2[web]'"


@dataclass(frozen=True)
class Settings:
    """The page's generation controls; ``temperature`` 0 means greedy decoding (``top_p`` unused)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Conversation:
    """One browser session's conversation.

    ``rounds``: the (user, assistant) rounds shown, a streaming answer's text
    so far included; ``pending``: a message shown that has no answer yet.
    """

    rounds: Tuple[Round, ...] = ()
    pending: Optional[str] = None


@dataclass(frozen=True)
class Partial:
    """What a backend streams: the answer so far; the last one has ``finish_reason`` and ``usage``.

    ``dropped_rounds``: how many of the oldest rounds were left out of the
    prompt to fit the context (through a server: its ``dropped_rounds`` field).
    """

    text: str
    finish_reason: Optional[str] = None
    dropped_rounds: int = 0
    usage: Optional[Usage] = None


@dataclass(frozen=True)
class Update:
    """The page after one step: the conversation (chat and state), the note under the chat, and the
    message box (``None``: leave what the user is typing alone)."""

    conversation: Conversation
    note: str = ""
    draft: Optional[str] = None


class ChatError(Exception):
    """A request the backend refused (bad input, prompt too long, server error), said in one line."""


class Backend(Protocol):
    """What answers: :class:`LocalBackend` or :class:`OpenAIBackend`."""

    description: str
    context_length: int
    defaults: Settings
    concurrency_limit: int

    def stream(self, system: Optional[str], rounds: Sequence[Round], text: str,
               settings: Settings) -> Iterator[Partial]:
        """Stream the answer to ``text`` after ``rounds``; raises :class:`ChatError` for a refused request."""


# -- conversation logic --------------------------------------------------------


def chatbot_messages(conversation: Conversation) -> List[Dict[str, Any]]:
    """The chat as ``gr.Chatbot`` shows it (messages format): one user and one assistant message per round."""
    messages = []
    for user, answer in conversation.rounds:
        messages += [_message("user", user), _message("assistant", answer)]
    if conversation.pending is not None:
        messages.append(_message("user", conversation.pending))
    return messages


def _message(role: str, text: str) -> Dict[str, Any]:
    # A text part, not a plain str: Gradio tidies a str (inspect.cleandoc: tabs to spaces, indentation and
    # blank first/last lines gone), and the chat must show the very text the next prompt holds.
    return {"role": role, "content": {"type": "text", "text": text}}


def conversation_json(conversation: Conversation) -> Dict[str, Any]:
    """The conversation as the page keeps it: plain JSON, read back by :func:`conversation_from_json`.

    Example:
        >>> conversation = Conversation((("Hi!", "Hello!"),), pending="How are you?")
        >>> conversation_json(conversation)
        {'rounds': [['Hi!', 'Hello!']], 'pending': 'How are you?'}
        >>> conversation_from_json(conversation_json(conversation)) == conversation
        True
    """
    return {"rounds": [list(round_) for round_ in conversation.rounds], "pending": conversation.pending}


def conversation_from_json(value: Dict[str, Any]) -> Conversation:
    """The :class:`Conversation` that :func:`conversation_json` gave the page."""
    return Conversation(tuple((user, answer) for user, answer in value["rounds"]), value["pending"])


def respond(backend: Backend, conversation: Conversation, text: str, system: Optional[str],
            settings: Settings, stop: Optional[threading.Event] = None) -> Iterator[Update]:
    """Answer ``text`` after the conversation's rounds, yielding the page as the answer streams in.

    Each update's conversation is what the page shows, so stopping at any
    point leaves shown history and state equal. After the first
    ``UNTHROTTLED_UPDATES``, partials closer than ``UPDATE_INTERVAL_S`` to the
    last update shown are folded into the next one. Once ``stop`` is set the answer ends where it is shown (the model
    stops at its next token), with no note; an unanswered message is dropped
    (:func:`stopped`). A refused request restores the conversation and puts
    ``text`` back in the message box.
    """
    rounds = conversation.rounds
    shown = Conversation(rounds, pending=text)
    yield Update(shown, draft="")
    last, shown_at, updates = Partial(""), 0.0, 0
    try:
        with closing(backend.stream(system or None, rounds, text, settings)) as stream:
            for last in stream:
                if stop is not None and stop.is_set():
                    if shown.pending is not None:
                        yield Update(stopped(shown))
                    return
                due = updates < UNTHROTTLED_UPDATES or time.monotonic() - shown_at >= UPDATE_INTERVAL_S
                if due and last.finish_reason is None:
                    shown, shown_at, updates = Conversation((*rounds, (text, last.text))), time.monotonic(), updates + 1
                    yield Update(shown)
    except ChatError as error:
        yield Update(Conversation(rounds), note=f"⚠️ {error}", draft=text)
        return
    note = finish_note(last, settings, backend.context_length)
    yield Update(Conversation((*rounds, (text, last.text))), note=note)


def finish_note(last: Partial, settings: Settings, context_length: int) -> str:
    """The note under a finished answer: dropped rounds, a cut answer, token counts.

    Example:
        >>> print(finish_note(Partial("Hi", "length", 0, Usage(90, 6)), Settings(max_new_tokens=6), 4096))
        ℹ️ The answer was cut at the limit of 6 new tokens.
        <BLANKLINE>
        90 prompt tokens (0 cached), 6 generated
    """
    lines = []
    if last.dropped_rounds:
        rounds = "round was" if last.dropped_rounds == 1 else "rounds were"
        lines.append(f"ℹ️ The {last.dropped_rounds} oldest {rounds} left out of the prompt: with "
                     f"{settings.max_new_tokens} tokens kept for the answer, the conversation did not fit in the "
                     f"context of {context_length} tokens.")
    if last.finish_reason == "length":
        lines.append(f"ℹ️ The answer was cut at the limit of {settings.max_new_tokens} new tokens.")
    if last.usage is not None:
        lines.append(f"{last.usage.prompt_tokens} prompt tokens ({last.usage.cached_tokens} cached), "
                     f"{last.usage.completion_tokens} generated")
    return "\n\n".join(lines)


def stopped(conversation: Conversation) -> Conversation:
    """The conversation once the user stopped an answer: what streamed so far stays; an unanswered message goes."""
    return Conversation(conversation.rounds)


class StopSignals:
    """The Stop button's signals to the answers running in each browser session.

    Stop is a signal the running answer acts on (:func:`respond`'s ``stop``),
    not Gradio's cancellation of the event: a cancelled event raced with its
    own last updates, so the page could show Gradio's "Error" under the chat,
    or keep streaming the answer Stop should have ended. A signalled answer
    instead ends as a finished event, on the conversation it last showed.
    A Stop before the answer has started (still queued) has nothing to stop.

    Example:
        >>> signals = StopSignals()
        >>> with signals.answering("session-1") as stop:
        ...     signals.stop("session-2"), stop.is_set(), signals.stop("session-1"), stop.is_set()
        (False, False, True, True)
        >>> signals.stop("session-1")  # no answer running any more
        False
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Dict[str, Set[threading.Event]] = {}

    @contextmanager
    def answering(self, session: str) -> Iterator[threading.Event]:
        """The stop signal of one answer of ``session``, for as long as it runs."""
        signal = threading.Event()
        with self._lock:
            self._running.setdefault(session, set()).add(signal)
        try:
            yield signal
        finally:
            with self._lock:
                self._running[session].discard(signal)
                if not self._running[session]:
                    del self._running[session]

    def stop(self, session: str) -> bool:
        """Signal every answer running in ``session`` to stop; whether there was one."""
        with self._lock:
            signals = list(self._running.get(session, ()))
        for signal in signals:
            signal.set()
        return bool(signals)


def rewind(conversation: Conversation, message_index: int) -> Tuple[Conversation, str]:
    """The rounds before the one holding chat message ``message_index``, and that round's user message.

    Retry answers that message again; undo puts it back in the message box.

    Example:
        >>> rewind(Conversation((("a", "1"), ("b", "2"))), 3)
        (Conversation(rounds=(('a', '1'),), pending=None), 'b')
    """
    index = _round_index(conversation, message_index)
    return Conversation(conversation.rounds[:index]), conversation.rounds[index][0]


def edit(conversation: Conversation, message_index: int, text: str) -> Tuple[Conversation, Optional[str]]:
    """Apply an edit of chat message ``message_index``: ``(conversation, message to answer or None)``.

    An edited user message drops its round and what follows, and is answered
    anew; an edited answer replaces that answer in place.

    Example:
        >>> edit(Conversation((("a", "1"), ("b", "2"))), 1, "one")
        (Conversation(rounds=(('a', 'one'), ('b', '2')), pending=None), None)
        >>> edit(Conversation((("a", "1"), ("b", "2"))), 0, "A")
        (Conversation(rounds=(), pending=None), 'A')
    """
    index = _round_index(conversation, message_index)
    rounds = conversation.rounds
    if message_index % 2 == 0:
        return Conversation(rounds[:index]), text
    return Conversation((*rounds[:index], (rounds[index][0], text), *rounds[index + 1:])), None


def _round_index(conversation: Conversation, message_index: int) -> int:
    if not 0 <= message_index < 2 * len(conversation.rounds):
        raise ValueError(f"message_index: {message_index} is not a message of an answered round "
                         f"(the chat has {len(conversation.rounds)})")
    return message_index // 2


def sampling_inputs(settings: Settings) -> Dict[str, Any]:
    """The ``stream_chat`` generation settings for the page's controls.

    Example:
        >>> sampling_inputs(Settings(max_new_tokens=64))
        {'max_new_tokens': 64, 'do_sample': False}
    """
    if settings.temperature == 0:
        return {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
    return {"max_new_tokens": settings.max_new_tokens, "do_sample": True, "temperature": settings.temperature,
            "top_p": settings.top_p}


def default_settings(model_dir: Optional[str]) -> Settings:
    """The controls' initial values from a checkpoint's ``generation_config.json`` (greedy unless it samples).

    Example:
        >>> from modelscope_llama2.constants import DEMO_DIR
        >>> default_settings(DEMO_DIR)
        Settings(max_new_tokens=1024, temperature=0.0, top_p=1.0)
    """
    from transformers import GenerationConfig

    has_config = model_dir is not None and os.path.isfile(os.path.join(model_dir, "generation_config.json"))
    config = GenerationConfig.from_pretrained(model_dir) if has_config else GenerationConfig()
    temperature = (config.temperature or 1.0) if config.do_sample else 0.0
    return Settings(config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature, config.top_p or 1.0)


# -- backends ------------------------------------------------------------------


class LocalBackend:
    """Answers in this process through the ModelScope facade: ``model.stream_chat(inputs, tokenizer)``."""

    # The batching engine runs every tab's answer in the same forward passes.
    concurrency_limit = API_CONCURRENCY

    def __init__(self, model: Any, tokenizer: Any, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.description = description
        self.context_length = model.engine.context_length
        self.defaults = default_settings(model.model_dir)

    def stream(self, system: Optional[str], rounds: Sequence[Round], text: str,
               settings: Settings) -> Iterator[Partial]:
        inputs = {"text": text, "system": system, "history": list(rounds), **sampling_inputs(settings)}
        try:
            outputs = self.model.stream_chat(inputs, self.tokenizer)  # checks the input before returning
        except (ValueError, TypeError) as error:
            raise ChatError(str(error)) from error
        # Closing the outputs ends generation at the next token: Stop frees the model at once.
        with closing(outputs):
            for output in outputs:
                usage = output["usage"]
                yield Partial(output["response"], output["finish_reason"], output["dropped_rounds"],
                              None if usage is None else Usage(usage["prompt_tokens"], usage["completion_tokens"],
                                                               usage["cached_tokens"]))


class OpenAIBackend:
    """Answers through a running ``python -m modelscope_llama2 serve`` (or any OpenAI-compatible server)."""

    concurrency_limit = API_CONCURRENCY

    def __init__(self, client: Any, model: str, defaults: Settings, context_length: int = CONTEXT_LENGTH,
                 description: str = ""):
        self.client = client
        self.model = model
        self.defaults = defaults
        self.context_length = context_length
        self.description = description

    def stream(self, system: Optional[str], rounds: Sequence[Round], text: str,
               settings: Settings) -> Iterator[Partial]:
        import openai

        request = {"max_tokens": settings.max_new_tokens, "temperature": settings.temperature}
        if settings.temperature:
            request["top_p"] = settings.top_p
        try:
            chunks = self.client.chat.completions.create(
                model=self.model, messages=dialog_from_history(text, rounds, system), stream=True,
                stream_options={"include_usage": True},
                # The server then drops the oldest rounds to fit, as chat() does, instead of refusing.
                extra_body={"truncation": "auto"}, **request)
            with closing(chunks):
                yield from _stream_chunks(chunks)
        except openai.APIStatusError as error:
            raise ChatError(f"the server refused the request ({error.status_code}): {_api_message(error)}") \
                from error
        except openai.APIConnectionError as error:
            raise ChatError(f"could not reach the server at {self.client.base_url}: {error}") from error


def _stream_chunks(chunks: Iterator[Any]) -> Iterator[Partial]:
    """Partials from OpenAI chat completion chunks: the deltas joined, then finish reason and usage."""
    text, shown, finish_reason, usage, dropped = "", "", None, None, 0
    for chunk in chunks:
        # The server's extension field, in the first chunk of a "truncation": "auto" request.
        dropped = getattr(chunk, "dropped_rounds", None) or dropped
        if chunk.usage is not None:
            details = chunk.usage.prompt_tokens_details
            usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                          (details.cached_tokens or 0) if details is not None else 0)
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        text += choice.delta.content or ""
        # Meta's format strips each answer, so the page shows it stripped too.
        if text.strip() != shown:
            shown = text.strip()
            yield Partial(shown)
    yield Partial(shown, finish_reason or "stop", dropped, usage)


def _api_message(error: Any) -> str:
    # The SDK keeps the "error" object of OpenAI's error body as error.body.
    body = error.body if isinstance(error.body, dict) else {}
    return body.get("message") or error.message


# -- loading -------------------------------------------------------------------


def local_backend(model: Optional[str] = None, revision: Optional[str] = None, device: Optional[str] = None,
                  dtype: str = "auto") -> LocalBackend:
    """Load ``model`` (a dir or hub id; ``None``: the demo checkpoint) for in-process answers."""
    model_dir = resolve_model_dir(model, revision)
    # The chat pipeline loads through Model.from_pretrained with the terminal chat's device handling.
    pipe = load_pipeline(model_dir, device, dtype)
    # The serving engine, not the eager one: two tabs answer at once instead of one after the other.
    pipe.model.engine = serving_engine(pipe.model, max_batch_size=API_CONCURRENCY)
    description = DEMO_NOTICE if model is None else f"Model: `{model}`, in this process on {pipe.model.device}."
    return LocalBackend(pipe.model, pipe.tokenizer, description)


def openai_backend(api_base: str, api_key: Optional[str] = None, model: Optional[str] = None) -> OpenAIBackend:
    """A client of the server at ``api_base`` (e.g. ``http://127.0.0.1:8000/v1``), checked by listing its models.

    ``model``: the served model name (default: the server's first); when it is
    a local checkpoint dir, its ``generation_config.json`` gives the defaults.
    """
    openai = _require("openai")
    client = openai.OpenAI(base_url=api_base, api_key=api_key or os.environ.get(API_KEY_ENV) or "none",
                           max_retries=0)
    try:
        served = {entry.id: entry for entry in client.models.list()}
    except openai.APIError as error:
        raise RuntimeError(f"--api-base {api_base}: could not list the server's models: {error}") from error
    if not served:
        raise RuntimeError(f"--api-base {api_base}: the server lists no models")
    name = model or next(iter(served))
    if name not in served:
        raise ValueError(f"--model {name}: the server at {api_base} serves {sorted(served)}")
    # vLLM's extension of the model card, which `serve` sends too.
    context_length = (served[name].model_extra or {}).get("max_model_len") or CONTEXT_LENGTH
    defaults = default_settings(os.path.expanduser(model) if model else None)
    return OpenAIBackend(client, name, defaults, context_length, f"Model: `{name}`, served at {api_base}.")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(INSTALL_HINT) from error


# -- the page ------------------------------------------------------------------

def build_demo(backend: Backend, title: str = "Llama 2 chat") -> Any:
    """The Gradio app (``gr.Blocks``) chatting with ``backend``; ``demo.launch()`` serves it."""
    # No usage reports to Gradio's servers from a local chat page.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    gr = _require("gradio")

    defaults = backend.defaults
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n{backend.description}")
        with gr.Row():
            with gr.Column(scale=3):
                # Grows with the conversation up to max_height, then scrolls.
                chatbot = gr.Chatbot(label="Chat", editable="all", height=None, min_height=480, max_height=780,
                                     elem_id="chat",
                                     placeholder="Ask something, e.g. *Where is the capital of Zhejiang?*")
                note = gr.Markdown(elem_id="note")
                with gr.Row():
                    message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                         scale=6, elem_id="message", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                with gr.Row():
                    retry = gr.Button("Retry", size="sm", elem_id="retry")
                    clear = gr.Button("Clear", size="sm", elem_id="clear")
            with gr.Column(scale=1, min_width=260):
                system = gr.Textbox(label="System prompt", placeholder="none", lines=4, elem_id="system")
                max_new_tokens = gr.Slider(1, backend.context_length - 1, value=defaults.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="Temperature (0: greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p", elem_id="top-p")
        # The conversation lives in the page, not in a gr.State on the server: the chat and it then change
        # in the same update, so they cannot diverge. With a gr.State, Stop could leave the state one token
        # ahead of the chat (the last streamed update reached the state, but the page dropped it with the
        # cancelled event), and the next prompt held text the user never saw. The handlers get and return
        # it as plain JSON (conversation_json), and work on Conversation inside.
        conversation = gr.JSON(conversation_json(Conversation()), visible=False)
        stop_signals = StopSignals()

        page = [message, chatbot, conversation, note]
        controls = [conversation, system, max_new_tokens, temperature, top_p]

        def show(update: Update) -> tuple:
            draft = gr.skip() if update.draft is None else update.draft
            return draft, chatbot_messages(update.conversation), conversation_json(update.conversation), update.note

        def answer(request: Any, conversation: Conversation, text: str, system: str, max_new_tokens: float,
                   temperature: float, top_p: float) -> Iterator[tuple]:
            with stop_signals.answering(request.session_hash) as stop:
                for update in respond(backend, conversation, text, system,
                                      Settings(int(max_new_tokens), temperature, top_p), stop):
                    yield show(update)

        # Gradio passes a handler its gr.Request (a positional parameter so annotated): the session_hash is
        # the browser tab, whose answers the tab's Stop signals.
        def on_send(text: str, state: Dict[str, Any], system: str, max_new_tokens: float, temperature: float,
                    top_p: float, request: gr.Request) -> Iterator[tuple]:
            if text.strip():
                yield from answer(request, conversation_from_json(state), text, system, max_new_tokens,
                                  temperature, top_p)

        def on_retry(state: Dict[str, Any], system: str, max_new_tokens: float, temperature: float, top_p: float,
                     request: gr.Request) -> Iterator[tuple]:
            conversation = conversation_from_json(state)
            if conversation.rounds:
                yield from answer(request, *rewind(conversation, 2 * len(conversation.rounds) - 1), system,
                                  max_new_tokens, temperature, top_p)

        def on_retry_message(data: gr.RetryData, state: Dict[str, Any], system: str, max_new_tokens: float,
                             temperature: float, top_p: float, request: gr.Request) -> Iterator[tuple]:
            yield from answer(request, *rewind(conversation_from_json(state), data.index), system, max_new_tokens,
                              temperature, top_p)

        def on_edit(data: gr.EditData, state: Dict[str, Any], system: str, max_new_tokens: float,
                    temperature: float, top_p: float, request: gr.Request) -> Iterator[tuple]:
            edited, text = edit(conversation_from_json(state), data.index, data.value)  # the edited text
            if text is None:
                yield show(Update(edited))
            else:
                yield from answer(request, edited, text, system, max_new_tokens, temperature, top_p)

        def on_undo(data: gr.UndoData, state: Dict[str, Any]) -> tuple:
            earlier, text = rewind(conversation_from_json(state), data.index)
            return show(Update(earlier, draft=text))

        def on_stop(request: gr.Request) -> None:
            stop_signals.stop(request.session_hash)

        def on_clear() -> tuple:
            return show(Update(Conversation()))

        generating = dict(outputs=page, concurrency_id="generate", concurrency_limit=backend.concurrency_limit,
                          show_progress="minimal")
        answers = [
            gr.on([message.submit, send.click], on_send, [message, *controls], **generating),
            retry.click(on_retry, controls, **generating),
            chatbot.retry(on_retry_message, controls, **generating),
            chatbot.edit(on_edit, controls, **generating),
        ]
        # No outputs and no cancels: the signalled answer ends itself, showing where it stopped (StopSignals).
        stop.click(on_stop, None, None, queue=False)
        chatbot.undo(on_undo, [conversation], page, cancels=answers, queue=False)
        # Both clear controls empty the state too: the chat's own trash icon and the button.
        chatbot.clear(on_clear, None, page, cancels=answers, queue=False)
        clear.click(on_clear, None, page, cancels=answers, queue=False)
    return demo


def run(model: Optional[str], revision: Optional[str], api_base: Optional[str], api_key: Optional[str],
        host: str, port: int, share: bool, device: Optional[str], dtype: str) -> int:
    """Serve the web chat until interrupted; see the module docstring."""
    # ModelScope logs each load step at INFO; the page's URL is what matters.
    logging.getLogger("modelscope").setLevel(logging.WARNING)
    if api_base:
        unused = {"--revision": revision, "--device": device, "--dtype": None if dtype == "auto" else dtype}
        for option, value in unused.items():
            if value is not None:
                raise ValueError(f"{option}: the server at --api-base loads the model; give {option} to `serve`")
        backend = openai_backend(api_base, api_key, model)
    else:
        backend = local_backend(model, revision, device, dtype)
    if share or host != "127.0.0.1":
        # The page has no login: whoever reaches it can use the model (and the server's key).
        logging.getLogger(__name__).warning("the web chat has no login; with %s anyone who reaches it can use it",
                                            "--share true" if share else f"--host {host}")
    demo = build_demo(backend).queue()
    local_url = _launch(demo, host, port, share)
    # Gradio's own lines name launch() arguments; these name the flags.
    print(f"* Running on local URL: {local_url}", flush=True)
    if not share:
        print("* For a public gradio.live link (anyone who has it can chat): --share true", flush=True)
    demo.block_thread()
    return 0


def _launch(demo: Any, host: str, port: int, share: bool) -> str:
    """Start serving ``demo`` in the background; its local URL. Gradio's errors told in flags."""
    try:
        _, local_url, _ = demo.launch(server_name=host, server_port=port, share=share, quiet=True,
                                      prevent_thread_lock=True)
    except OSError as error:  # the port was taken since the CLI checked it
        raise OSError(f"--port {port}: cannot listen on {host}:{port} ({error}); choose another --port") from error
    except ValueError as error:
        if "share=True" not in str(error):
            raise
        raise ValueError(f"--host {host} --port {port}: the page is not reachable from this machine (a proxy for "
                         "localhost?); --share true publishes it through a gradio.live link instead") from error
    return local_url
