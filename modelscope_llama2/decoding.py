"""From token events to text: incremental detokenizing and stop strings, shared by every engine.

:class:`StreamingDetokenizer` turns a growing list of token ids into text at
constant work per token (it decodes only a short window, as vLLM and
transformers' ``TextIteratorStreamer`` do), never shows half a UTF-8
character, and cuts at stop strings even when they span tokens.
:func:`decode_stream` runs prompts through an engine and yields
:class:`TextDelta` items; a request whose text hits a stop string is aborted
in the engine at once.

Example:
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> tok = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    >>> detok = StreamingDetokenizer(tok, stop=("Lake",))
    >>> pieces = [detok.add([i]) for i in tok.encode("West Lake is here")]
    >>> "".join(pieces) + detok.finish(), detok.stopped
    ('West ', True)
"""

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from .engines.base import Engine, TokenEvent, TokenLogprob, Usage
from .prompts.prompt import Prompt

REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


class StreamingDetokenizer:
    """Text of a growing sequence of token ids, revealed as it settles.

    ``prefix_ids`` are decoded before the new ids (a completion's prompt,
    so its first word keeps its leading space) but not returned. ``stop``:
    the text ends before the first occurrence of any of these strings; a
    tail that may be the start of one is held back until it is not.
    """

    def __init__(self, tokenizer, prefix_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self._decode = tokenizer.decode
        self._ids = list(prefix_ids)
        # Decode window: ids[_start:_read] are settled text; ids[_read:] are new.
        # A few settled ids before the new ones keep sentencepiece's
        # leading-space handling the same as for a full decode.
        self._read = len(self._ids)
        self._start = max(0, self._read - 4)
        self._stops = tuple(_StopMatcher(s) for s in stop)
        self.text = ""  # settled text, cut at a stop
        self._shown = 0  # characters of text returned so far
        self.stopped = False

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new ids; return the text that became safe to show (may be ``''``)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        settled = self._decode(self._ids[self._start:self._read])
        window = self._decode(self._ids[self._start:])
        if len(window) > len(settled) and not window.endswith(REPLACEMENT):
            self._append(window[len(settled):])
            self._start, self._read = self._read, len(self._ids)
        return self._reveal(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended (an incomplete last character is dropped)."""
        if not self.stopped and self._read < len(self._ids):
            settled = self._decode(self._ids[self._start:self._read])
            self._append(self._decode(self._ids[self._start:])[len(settled):].rstrip(REPLACEMENT))
            self._read = len(self._ids)
        return self._reveal(final=True)

    def _append(self, new_text: str) -> None:
        start = len(self.text)
        self.text += new_text
        cuts = [cut for cut in (stop.feed(new_text, start) for stop in self._stops) if cut is not None]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def _reveal(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            # The longest tail that may still grow into a stop string is held back.
            end -= max((stop.matched for stop in self._stops), default=0)
        if end <= self._shown:
            return ""
        segment, self._shown = self.text[self._shown:end], end
        return segment


class _StopMatcher:
    """Where one stop string first occurs in a growing text, at O(new text) per call (Knuth-Morris-Pratt).

    :attr:`matched` is the length of the longest tail of the text so far that
    starts the stop string: what must be held back. Checking every prefix
    with ``endswith`` would cost O(len(stop)^2) a token, seconds for a long stop.

    Example:
        >>> stop = _StopMatcher("abab")
        >>> stop.feed("xaba", 0), stop.matched
        (None, 3)
        >>> stop.feed("bab", 4)
        1
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        # fallback[k]: the longest proper prefix of stop[:k + 1] that is also its suffix.
        self._fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fallback[i] = k

    def feed(self, new_text: str, offset: int) -> Optional[int]:
        """Take text appended at ``offset``; the start of the first full match in it, or None."""
        stop, k = self.stop, self.matched
        for i, char in enumerate(new_text):
            while k and char != stop[k]:
                k = self._fallback[k - 1]
            if char == stop[k]:
                k += 1
                if k == len(stop):
                    self.matched = k
                    return offset + i + 1 - k
        self.matched = k
        return None


@dataclass(frozen=True)
class TextDelta:
    """New text of one request; the last one has ``finish_reason`` and ``usage``.

    ``token_ids`` are the ids that arrived with this delta (EOS excluded);
    ``logprobs`` and ``prompt_logprobs`` are passed on from the engine's
    :class:`~modelscope_llama2.engines.base.TokenEvent`.
    """

    request_id: str
    text: str
    token_ids: Tuple[int, ...] = ()
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    logprobs: Tuple[TokenLogprob, ...] = ()
    prompt_logprobs: Optional[Tuple[Optional[TokenLogprob], ...]] = None

    def then(self, later: "TextDelta") -> "TextDelta":
        """This delta and the ``later`` one of the same request as one (for a consumer that fell behind).

        Example:
            >>> TextDelta("r", "West", (1,)).then(TextDelta("r", " Lake", (2,), "stop")).text
            'West Lake'
        """
        return TextDelta(self.request_id, self.text + later.text, self.token_ids + later.token_ids,
                         later.finish_reason, later.usage, self.logprobs + later.logprobs,
                         self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs)


def detokenizer_for(prompt: Prompt, tokenizer) -> StreamingDetokenizer:
    return StreamingDetokenizer(tokenizer, prompt.decode_prefix, prompt.sampling.stop)


def decode_stream(engine: Engine, prompts: Sequence[Prompt], tokenizer) -> Iterator[TextDelta]:
    """Run ``prompts`` through ``engine``, yielding each request's text as it settles.

    A request whose text reaches a stop string is aborted in the engine and
    finishes with ``'stop'``. Closing this iterator aborts what is left.
    """
    detokenizers: Dict[str, StreamingDetokenizer] = {p.request_id: detokenizer_for(p, tokenizer) for p in prompts}
    events = engine.generate(prompts)
    try:
        for event in events:
            delta = text_delta(detokenizers[event.request_id], event, engine.abort)
            if delta is not None:
                yield delta
    finally:
        events.close()


def text_delta(detok: StreamingDetokenizer, event: TokenEvent, abort: Callable[[str], None]) -> Optional[TextDelta]:
    """The :class:`TextDelta` for one token event, or None when it adds nothing.

    Calls ``abort(request_id)`` when the text has just reached a stop string,
    so the engine stops generating what nobody will see.
    """
    was_stopped = detok.stopped
    text = detok.add(event.token_ids)
    if detok.stopped and not was_stopped and not event.finished:
        abort(event.request_id)
    if event.finished:
        text += detok.finish()
        reason = "stop" if detok.stopped else event.finish_reason
        return TextDelta(event.request_id, text, event.token_ids, reason, event.usage, event.logprobs,
                         event.prompt_logprobs)
    if text or event.token_ids or event.prompt_logprobs is not None:
        return TextDelta(event.request_id, text, event.token_ids, logprobs=event.logprobs,
                         prompt_logprobs=event.prompt_logprobs)
    return None
