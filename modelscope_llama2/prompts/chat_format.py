"""Llama 2 chat prompt format, token-exact with Meta's reference.

Pure Python, no torch: everything here takes an ``encode`` function (one
sentencepiece encode call per segment, without BOS/EOS) and the BOS/EOS ids.
The spec is ``Llama.chat_completion`` in meta-llama/llama ``llama/generation.py``:

* every completed (user, assistant) round is
  ``[BOS] + encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [EOS]``;
* the last user turn is ``[BOS] + encode(f"[INST] {user.strip()} [/INST]")``;
* a system prompt is folded into the first user message as
  ``"<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + user`` before the strip.

Example:
    >>> import os
    >>> import sentencepiece as spm
    >>> sp = spm.SentencePieceProcessor(model_file=os.path.join(DEMO_DIR, "tokenizer.model"))
    >>> dialog = dialog_from_history("Hi!", history=[("Hello", "Hello!")], system="Be brief.")
    >>> ids = encode_dialog(dialog, sp.encode, bos_id=1, eos_id=2)
    >>> ids == [1, *sp.encode("[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nHello [/INST] Hello! "), 2,
    ...         1, *sp.encode("[INST] Hi! [/INST]")]
    True
"""

from typing import Callable, List, Literal, Optional, Sequence, Tuple, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]
Encode = Callable[[str], List[int]]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def answer_text(generated: str) -> str:
    """An answer as Meta's format keeps it in later rounds, and as ``chat()`` and the server return it: stripped.

    Example:
        >>> answer_text(" Hangzhou is a city. ")
        'Hangzhou is a city.'
    """
    return generated.strip()


class AnswerStream:
    """:func:`answer_text` for text that arrives in pieces: what each piece adds to the stripped answer.

    Leading whitespace is dropped; trailing whitespace is held back until
    more text follows it, and dropped at the end, so the pieces returned
    join to ``answer_text`` of the whole.

    Example:
        >>> stream = AnswerStream()
        >>> [stream.feed(piece) for piece in (" ", " Hi", " there ", "\\n")] + [stream.feed("", final=True)]
        ['', 'Hi', ' there', '', '']
    """

    def __init__(self) -> None:
        self._started, self._held = False, ""

    def feed(self, piece: str, final: bool = False) -> str:
        text = self._held + piece
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        shown = text.rstrip()
        self._held = "" if final else text[len(shown):]
        return shown


def dialog_from_history(
    text: str,
    history: Sequence[Tuple[str, str]] = (),
    system: Optional[str] = None,
) -> Dialog:
    """Turn ModelScope's ``(system, history, text)`` into a Meta-style dialog.

    ``system`` of ``None`` or ``""`` means no system message, as in Meta's
    reference since Aug 2023.
    """
    dialog: Dialog = []
    if system:
        dialog.append({"role": "system", "content": system})
    for user, assistant in history:
        dialog.append({"role": "user", "content": user})
        dialog.append({"role": "assistant", "content": assistant})
    dialog.append({"role": "user", "content": text})
    return dialog


def check_text(text: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if ``text`` cannot be encoded (a lone UTF-16 surrogate, as JSON's ``"\\ud800"`` gives).

    Example:
        >>> check_text("x\\ud800y", "messages[0]['content']")
        Traceback (most recent call last):
        ...
        ValueError: messages[0]['content']: contains a lone UTF-16 surrogate (U+D800) at character 1, which is not text
    """
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: contains a lone UTF-16 surrogate (U+{ord(text[error.start]):04X}) at character "
                         f"{error.start}, which is not text") from None


def check_dialog(dialog: Sequence[Message], allow_special_tags: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``dialog`` is one Meta accepts.

    Roles: an optional leading ``system``, then ``user``/``assistant``
    alternating, ending with ``user``. Unless ``allow_special_tags``, no
    message may contain ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>``
    (Meta's reference refuses these too: they let a user forge turns).
    """
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise TypeError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise TypeError(f"messages[{i}]: expected a dict with keys 'role' and 'content', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise TypeError(f"messages[{i}]['content']: expected a string, got {type(message.get('content')).__name__}")
        check_text(message["content"], f"messages[{i}]['content']")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + len(dialog) - len(turns)
            raise ValueError(
                f"messages[{position}]['role']: expected {expected!r} (an optional 'system' message first, "
                f"then 'user' and 'assistant' alternating), got {message['role']!r}"
            )
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("messages: the last message must have role 'user'")
    if not allow_special_tags:
        for i, message in enumerate(dialog):
            found = [tag for tag in SPECIAL_TAGS if tag in message["content"]]
            if found:
                raise ValueError(
                    f"messages[{i}] ({message['role']}) contains the control tag(s) {found}, which Meta's "
                    "reference refuses; pass allow_special_tags=True to send them as plain text"
                )


def _fold_system(dialog: Sequence[Message]) -> List[Message]:
    if dialog[0]["role"] != "system":
        return list(dialog)
    first = dialog[1]
    folded: Message = {"role": first["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + first["content"]}
    return [folded, *dialog[2:]]


def encode_round(user: str, answer: str, encode: Encode, bos_id: int, eos_id: int) -> List[int]:
    """Ids of one completed round: BOS, ``[INST] user [/INST] answer ``, EOS."""
    return [bos_id, *encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "), eos_id]


def encode_last_turn(user: str, encode: Encode, bos_id: int) -> List[int]:
    """Ids of the final user turn that the model answers."""
    return [bos_id, *encode(f"{B_INST} {user.strip()} {E_INST}")]


def encode_dialog_segments(dialog: Sequence[Message], encode: Encode, bos_id: int, eos_id: int) -> List[List[int]]:
    """Ids of each round of ``dialog`` (system folded in), last turn last.

    The dialog is assumed valid (see :func:`check_dialog`).
    """
    turns = _fold_system(dialog)
    segments = [
        encode_round(user["content"], answer["content"], encode, bos_id, eos_id)
        for user, answer in zip(turns[:-1:2], turns[1::2])
    ]
    segments.append(encode_last_turn(turns[-1]["content"], encode, bos_id))
    return segments


def _encode_first_segment(dialog: Sequence[Message], encode: Encode, bos_id: int, eos_id: int) -> List[int]:
    turns = _fold_system(dialog)
    if len(turns) == 1:
        return encode_last_turn(turns[0]["content"], encode, bos_id)
    return encode_round(turns[0]["content"], turns[1]["content"], encode, bos_id, eos_id)


def encode_dialog(dialog: Sequence[Message], encode: Encode, bos_id: int, eos_id: int) -> List[int]:
    """Prompt ids for ``dialog``, token for token what Meta's ``chat_completion`` builds."""
    return [token for segment in encode_dialog_segments(dialog, encode, bos_id, eos_id) for token in segment]


class PromptTooLong(ValueError):
    """The prompt does not fit its token budget (even with every past round dropped).

    ``prompt_tokens`` and ``budget`` carry the numbers, for an HTTP error body.
    """

    def __init__(self, message: str, prompt_tokens: int = 0, budget: int = 0):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.budget = budget


def fit_dialog(
    dialog: Sequence[Message], encode: Encode, bos_id: int, eos_id: int, budget: int
) -> Tuple[List[int], int]:
    """Encode ``dialog``, dropping the oldest whole rounds until it fits ``budget`` tokens.

    The system message (folded into the first kept round) and the last user
    turn are never dropped. Returns ``(prompt_ids, rounds_dropped)``; raises
    :class:`PromptTooLong` when the system prompt plus the last turn alone
    exceed ``budget``.
    """
    system = list(dialog[:1]) if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system):])
    segments = encode_dialog_segments(turns, encode, bos_id, eos_id)
    # Dropping rounds only changes the first kept segment (it carries the
    # system prompt), so the other rounds are encoded once, above.
    tail_len = sum(len(segment) for segment in segments)
    for dropped in range(len(segments)):
        tail_len -= len(segments[dropped])
        head = segments[dropped]
        if system:
            head = _encode_first_segment(system + turns[2 * dropped:], encode, bos_id, eos_id)
        if len(head) + tail_len <= budget:
            return [*head, *(t for segment in segments[dropped + 1:] for t in segment)], dropped
    raise PromptTooLong(
        f"the system prompt plus the current message take {len(head)} tokens, more than the "
        f"{budget} tokens the prompt may use (max_length minus the tokens reserved for the response)",
        prompt_tokens=len(head) + tail_len, budget=budget,
    )
