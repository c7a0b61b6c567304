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
from typing import Any, AsyncIterator, List, Optional, Sequence, Tuple

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

    def run(self, prompts: List[Prompt]) -> AsyncIterator[Tuple[int, TextDelta]]:
        """``(choice index, delta)`` pairs as they come; closing the iterator aborts every unfinished choice.

        Raises :class:`~modelscope_llama2.serving.errors.APIError` (429) at once when the waiting line is full.
        """
        self.admission.check(len(prompts))
        return self._merged(prompts)

    async def _merged(self, prompts: List[Prompt]) -> AsyncIterator[Tuple[int, TextDelta]]:
        queue: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()

        async def pump(index: int, prompt: Prompt) -> None:
            arrived = time.perf_counter()  # TTFT includes the wait for a slot, as clients see it
            try:
                async with self.admission.slot():
                    await self._stream_one(index, prompt, queue, arrived)
            except Exception as error:  # re-raised in the consumer
                await queue.put((index, error))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
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
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_one(self, index: int, prompt: Prompt, queue: "asyncio.Queue", arrived: float) -> None:
        started = last = arrived
        first = True
        stream = self.backend.stream(prompt)
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
