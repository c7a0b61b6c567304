"""Engine logprobs in OpenAI's two shapes: chat's ``logprobs.content[]`` and completions' legacy lists.

A token's text is its sentencepiece piece with ``▁`` read as a space; a
byte-fallback piece (``<0xE9>``) is that one byte, shown as OpenAI shows
partial characters (``\\xe9``) with the raw value in ``bytes``; control
tokens (``<s>``, ``</s>``) keep their piece. The numbers are the engine's
raw log-softmax (see :mod:`modelscope_llama2.engines.logits`).

Example:
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.engines.base import TokenLogprob
    >>> tokens = TokenTexts(Llama2Tokenizer.from_pretrained(DEMO_DIR))
    >>> tokens.text(1), tokens.bytes(1)
    ('<s>', [60, 115, 62])
    >>> legacy = LegacyLogprobs(tokens)
    >>> legacy.add([None, TokenLogprob(1, -0.5, ((1, -0.5),))], token_ids=[1, 1])
    >>> legacy.model().token_logprobs, legacy.model().text_offset
    ([None, -0.5], [0, 0])
"""

from typing import Iterable, List, Optional

from ..engines.base import TokenLogprob
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

SPACE_PIECE = "\u2581"  # sentencepiece's word-boundary marker


class TokenTexts:
    """Each token id's text and UTF-8 bytes, as the logprobs shapes show them."""

    def __init__(self, tokenizer):
        self.sp = tokenizer.sp_model

    def bytes(self, token_id: int) -> List[int]:
        if self.sp.is_byte(token_id):
            return [int(self.sp.id_to_piece(token_id)[3:-1], 16)]
        return list(self.sp.id_to_piece(token_id).replace(SPACE_PIECE, " ").encode("utf-8"))

    def text(self, token_id: int) -> str:
        return bytes(self.bytes(token_id)).decode("utf-8", errors="backslashreplace")

    def width(self, token_id: int) -> int:
        """Characters the token adds to decoded text (control tokens add none)."""
        return 0 if self.sp.is_control(token_id) else len(self.text(token_id))


def chat_content(tokens: TokenTexts, entries: Iterable[TokenLogprob]) -> List[ChatTokenLogprob]:
    """OpenAI chat's ``logprobs.content`` items for generated tokens."""
    return [ChatTokenLogprob(token=tokens.text(e.token_id), logprob=e.logprob, bytes=tokens.bytes(e.token_id),
                             top_logprobs=[TopLogprob(token=tokens.text(i), logprob=lp, bytes=tokens.bytes(i))
                                           for i, lp in e.top])
            for e in entries]


def chat_logprobs(tokens: TokenTexts, entries: Iterable[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=chat_content(tokens, entries))


class LegacyLogprobs:
    """Completions' ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), built as
    tokens arrive; offsets count characters from the start of the choice's text (the prompt's, with ``echo``;
    control tokens such as ``<s>`` take no room in it).

    ``None`` entries (the first prompt token, which nothing predicts) have ``null`` numbers.
    """

    def __init__(self, tokens: TokenTexts):
        self.tokens_text = tokens
        self.offset = 0
        self._reset()

    def _reset(self) -> None:
        self.tokens: List[str] = []
        self.token_logprobs: List[Optional[float]] = []
        self.top_logprobs: List[Optional[dict]] = []
        self.text_offset: List[int] = []

    def add(self, entries: Iterable[Optional[TokenLogprob]], token_ids: Iterable[int] = ()) -> None:
        """Append ``entries``; a ``None`` entry takes its id from ``token_ids`` (same positions)."""
        ids = list(token_ids)
        for position, entry in enumerate(entries):
            token_id = entry.token_id if entry is not None else ids[position]
            text = self.tokens_text.text(token_id)
            self.tokens.append(text)
            self.token_logprobs.append(None if entry is None else entry.logprob)
            self.top_logprobs.append(None if entry is None else {self.tokens_text.text(i): lp for i, lp in entry.top})
            self.text_offset.append(self.offset)
            self.offset += self.tokens_text.width(token_id)

    def model(self) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs,
                                  top_logprobs=self.top_logprobs, text_offset=self.text_offset)

    def take(self) -> CompletionLogprobs:
        """What was added since the last ``take()`` (a stream's chunk), offsets running on."""
        part = self.model()
        self._reset()
        return part
