"""Running a request's prompts: admitted, measured, merged into one stream of ``(choice, delta)`` pairs.

Example:
    >>> from modelscope_llama2.decoding import TextDelta
    >>> choice = Choice()
    >>> choice.add(TextDelta("r", "Hi", (5,)))
    >>> choice.text, choice.token_ids, choice.finish_reason
    (['Hi'], [5], None)
"""

import asyncio
import time
from typing import Any, AsyncIterator, List, Optional, Sequence, Set, Tuple

from ..decoding import TextDelta
from ..engines.base import TokenLogprob
from ..prompts.prompt import Prompt
from .admission import Admission
from .backend import Backend
from .metrics import ServerMetrics
from .protocol import PromptTokensDetails, UsageInfo

# Engine finish reasons to OpenAI's.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class Generation:
    """Runs a request's prompts through the backend, admitted and measured, merged into one stream."""

    def __init__(self, backend: Backend, admission: Admission, metrics: ServerMetrics):
        self.backend, self.admission, self.metrics = backend, admission, metrics
        self._outlets: Set["asyncio.Queue[Tuple[int, Any]]"] = set()  # of the requests generating now
        self._refusal: Optional[Exception] = None

    def run(self, prompts: List[Prompt], param: str = "n", whole: bool = False) -> AsyncIterator[Tuple[int, TextDelta]]:
        """``(choice index, delta)`` pairs as they come; closing the iterator aborts every unfinished choice.

        ``whole``: the answer goes out only once complete (the backend may then start a choice over elsewhere).

        The choices take their places in the waiting line now: raises
        :class:`~modelscope_llama2.serving.errors.APIError` (429, or 400
        naming ``param`` for more choices than can ever run) at once.
        """
        if self._refusal is not None:
            raise self._refusal
        self.admission.reserve(len(prompts), param)
        queue: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()
        started: List[int] = []
        tasks = [asyncio.create_task(self._pump(i, p, queue, started, whole)) for i, p in enumerate(prompts)]
        return self._merged(tasks, queue, started)

    def refuse(self, error: Exception) -> None:
        """Raise ``error`` for every request from now on (the server is draining)."""
        self._refusal = error

    @property
    def in_flight(self) -> int:
        """Requests generating now (each until its consumer has had its last delta or its error)."""
        return len(self._outlets)

    def fail_all(self, error: Exception) -> None:
        """End every request generating now with ``error`` (raised to its consumer): the drain timeout passed."""
        for queue in self._outlets:
            queue.put_nowait((0, error))

    async def _pump(self, index: int, prompt: Prompt, queue: "asyncio.Queue", started: List[int],
                    whole: bool) -> None:
        started.append(index)  # from here its slot() gives its place in the line back
        arrived = time.perf_counter()  # TTFT includes the wait for a slot, as clients see it
        try:
            async with self.admission.slot():
                await self._stream_one(index, prompt, queue, arrived, whole)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # re-raised in the consumer
            await queue.put((index, error))
        await queue.put((index, None))

    async def _merged(self, tasks: List["asyncio.Task"], queue: "asyncio.Queue",
                      started: List[int]) -> AsyncIterator[Tuple[int, TextDelta]]:
        self._outlets.add(queue)
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            self._outlets.discard(queue)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.admission.release(len(tasks) - len(started))  # cancelled before they ever ran

    async def _stream_one(self, index: int, prompt: Prompt, queue: "asyncio.Queue", arrived: float,
                          whole: bool) -> None:
        started = last = arrived
        first = True
        stream = self.backend.stream(prompt, whole)
        try:
            async for delta in stream:
                now = time.perf_counter()
                if delta.token_ids:
                    if first:
                        self.metrics.ttft.observe(now - started)
                        first = False
                    else:
                        self.metrics.inter_token.observe((now - last) / len(delta.token_ids))
                    last = now
                if delta.usage is not None:
                    self.metrics.record_usage(delta.usage)
                await queue.put((index, delta))
        finally:
            await stream.aclose()


class Choice:
    """A choice's text, ids and logprobs so far, and its final delta."""

    def __init__(self) -> None:
        self.text: List[str] = []
        self.token_ids: List[int] = []
        self.logprobs: List[TokenLogprob] = []
        self.prompt_logprobs: Optional[Tuple[Optional[TokenLogprob], ...]] = None
        self.final: Optional[TextDelta] = None

    def add(self, delta: TextDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.final = delta

    @property
    def finish_reason(self) -> Optional[str]:
        reason = self.final.finish_reason if self.final else None
        return FINISH_REASONS.get(reason, reason)


async def collect(deltas: AsyncIterator[Tuple[int, TextDelta]], count: int) -> List[Choice]:
    """Every choice of a request, generated to the end."""
    choices = [Choice() for _ in range(count)]
    async for index, delta in deltas:
        choices[index].add(delta)
    return choices


def usage(prompt_tokens: int, finals: Sequence[TextDelta]) -> UsageInfo:
    """OpenAI's ``usage`` from the prompt's length and each finished choice's last delta."""
    completion = sum(d.usage.completion_tokens for d in finals if d.usage)
    cached = max((d.usage.cached_tokens for d in finals if d.usage), default=0)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
