"""The terminal chat behind ``python -m modelscope_llama2 chat``.

On a terminal: a prompt with readline editing and history, streamed
answers, and the commands in :data:`COMMANDS`. Otherwise (stdin is a pipe or
a file) each input line is one message and each answer is printed as one
line (line breaks inside it written as ``\\n``), so the chat can be scripted::

    printf 'Where is the capital of Zhejiang?\\n' | python -m modelscope_llama2 chat

Without ``--model`` it runs on the demo checkpoint (:data:`~modelscope_llama2.constants.DEMO_DIR`).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, TextIO, Tuple

from ..constants import DEMO_DIR, LOAD_DTYPES as DTYPES

COMMANDS = {
    "/clear": "forget the conversation so far",
    "/system TEXT": "set the system prompt (no TEXT: none); the conversation is kept",
    "/history": "show the conversation so far",
    "/exit": "quit (also Ctrl-D)",
    "/help": "show this help",
}
HISTORY_FILE = os.path.join("~", ".cache", "modelscope_llama2", "chat_history")
DEMO_NOTICE = ("Using the built-in demo checkpoint: a few MB trained to answer a handful of example questions, "
               "a demo of the machinery, not a language model. "
               "For real answers: --model modelscope/Llama-2-13b-chat-ms")


@dataclass
class Conversation:
    """What the next message is sent with: the system prompt and the rounds so far."""

    system: Optional[str] = None
    history: List[Tuple[str, str]] = field(default_factory=list)


def resolve_model_dir(model: Optional[str], revision: Optional[str]) -> str:
    """A local checkpoint dir for ``model``: the demo, a local dir, or a hub id downloaded (with progress)."""
    if model is None:
        return DEMO_DIR
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if os.path.isabs(path) or model.startswith((".", "~")) or os.path.exists(path):
        raise FileNotFoundError(f"--model {model}: no such checkpoint directory")
    return _download(model, revision)


def _download(model_id: str, revision: Optional[str]) -> str:
    from modelscope.utils.constant import DEFAULT_MODEL_REVISION

    from ..checkpoints.hub import fetch_checkpoint

    # The hub client logs each retry; the failure is reported once, below.
    logging.getLogger("modelscope_hub").setLevel(logging.ERROR)
    try:
        return fetch_checkpoint(model_id, revision or DEFAULT_MODEL_REVISION)
    except Exception as error:  # network, auth, not found, failed verification: all end the command alike
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(f"could not download {model_id!r} from the ModelScope hub "
                           f"(offline, or a wrong id or revision?): {reason}") from error


def check_checkpoint_dir(path: str) -> None:
    """Fail with one line naming what a chat checkpoint dir lacks, before any loading."""
    missing = [name for name in ("configuration.json", "config.json", "tokenizer.model")
               if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(f"{path}: not a Llama 2 checkpoint, missing {', '.join(missing)}")


def load_pipeline(model_dir: str, device: Optional[str], dtype: str):
    """The chat pipeline on ``device`` (``auto``: accelerate's device_map) in ``dtype``."""
    import torch

    from ..pipelines import Llama2ChatPipeline

    check_checkpoint_dir(model_dir)
    placement = {"device_map": "auto"} if device == "auto" else {"device": device or "gpu"}
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    return Llama2ChatPipeline(model=model_dir, torch_dtype=torch_dtype, **placement)


class ChatSession:
    """One conversation with a chat pipeline, driven line by line."""

    def __init__(self, pipe: Any, out: TextIO, system: Optional[str] = None, max_new_tokens: Optional[int] = None):
        self.pipe = pipe
        self.out = out
        self.conversation = Conversation(system=system)
        self.settings = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}

    def handle(self, line: str, stream: bool) -> bool:
        """Act on one input line; ``False`` once the user asked to exit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.answer(text, stream)
        return True

    def command(self, text: str) -> bool:
        name, _, argument = text.partition(" ")
        if name == "/exit":
            return False
        if name == "/clear":
            self.conversation.history.clear()
            self.note("conversation cleared")
        elif name == "/system":
            self.conversation.system = argument.strip() or None
            self.note(f"system prompt: {self.conversation.system!r}" if argument.strip() else "no system prompt")
        elif name == "/history":
            self.show_history()
        elif name == "/help":
            self.note(help_text())
        else:
            self.note(f"unknown command {name}\n{help_text()}")
        return True

    def answer(self, text: str, stream: bool) -> None:
        request = dict(self.settings, history=list(self.conversation.history), system=self.conversation.system)
        try:
            result = self.stream(text, request) if stream else self.pipe(text, **request)
        except (ValueError, TypeError) as error:  # bad input: say so, keep chatting
            self.note(f"error: {error}")
            return
        if result is None:
            return
        self.conversation.history = list(result["history"])
        if not stream:
            self.out.write(one_line(result["response"]) + "\n")
            self.out.flush()

    def stream(self, text: str, request: dict) -> Optional[dict]:
        """Print the answer as it grows; Ctrl-C stops it and returns ``None`` (nothing is kept)."""
        shown, result = "", None
        try:
            for result in self.pipe.stream(text, **request):
                self.out.write(result["response"][len(shown):])
                self.out.flush()
                shown = result["response"]
        except KeyboardInterrupt:
            self.out.write("\n")
            self.note("interrupted; this answer is not kept")
            return None
        self.out.write("\n")
        return result

    def show_history(self) -> None:
        if self.conversation.system:
            self.out.write(f"system: {one_line(self.conversation.system)}\n")
        for user, assistant in self.conversation.history:
            self.out.write(f"user: {one_line(user)}\nassistant: {one_line(assistant)}\n")
        self.out.flush()

    @staticmethod
    def note(message: str) -> None:
        # Notes go to stderr so that stdout holds only answers (and /history).
        print(message, file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def help_text() -> str:
    return "commands:\n" + "\n".join(f"  {name:<14} {what}" for name, what in COMMANDS.items())


def run_terminal(session: ChatSession) -> None:
    """The interactive loop: readline prompt, streamed answers, history saved across runs."""
    history_file = _enable_readline()
    ChatSession.note("Type a message, or /help for commands.")
    try:
        while True:
            try:
                line = input("user> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, like a shell
                print(file=session.out)
                continue
            except EOFError:
                print(file=session.out)
                return
            if not session.handle(line, stream=True):
                return
    finally:
        if history_file:
            import readline

            readline.write_history_file(history_file)


def _enable_readline() -> Optional[str]:
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return None
    path = os.path.expanduser(HISTORY_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    return path


def run_lines(session: ChatSession, lines: TextIO) -> None:
    """Scripted use: one message (or command) per input line, one answer per output line."""
    for line in lines:
        if not session.handle(line, stream=False):
            return


def run(model: Optional[str], revision: Optional[str], system: Optional[str], device: Optional[str],
        dtype: str, max_new_tokens: Optional[int]) -> int:
    """Load the model and chat on stdin/stdout; see the module docstring."""
    # ModelScope logs each load step at INFO; the chat shows only what matters.
    logging.getLogger("modelscope").setLevel(logging.WARNING)
    if model is None:
        ChatSession.note(DEMO_NOTICE)
    model_dir = resolve_model_dir(model, revision)
    session = ChatSession(load_pipeline(model_dir, device, dtype), sys.stdout, system, max_new_tokens)
    if sys.stdin.isatty():
        run_terminal(session)
    else:
        run_lines(session, sys.stdin)
    return 0
