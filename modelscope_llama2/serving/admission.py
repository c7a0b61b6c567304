"""Admission: a bounded number of running choices, a bounded waiting line, 429 past it.

A request's choices take their places in the line when it is checked, not
when their generation starts, so a burst of requests arriving together is
held to the bound like requests arriving one by one.

Example:
    >>> from modelscope_llama2.serving.metrics import ServerMetrics
    >>> admission = Admission(max_running=2, max_waiting=1, metrics=ServerMetrics())
    >>> admission.reserve(2)
    >>> admission.reserve(1)
    >>> admission.reserve(1)
    Traceback (most recent call last):
    ...
    modelscope_llama2.serving.errors.APIError: The server is at capacity (running and waiting requests are full); retry later.
    >>> admission.reserve(3, param="prompt")
    Traceback (most recent call last):
    ...
    modelscope_llama2.serving.errors.APIError: prompt: at most 2 choices per request on this server
"""

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from .errors import APIError
from .metrics import ServerMetrics

# What a 429 tells a client to wait before it retries (seconds): about one short answer.
RETRY_AFTER_S = 1


class Admission:
    """At most ``max_running`` choices generate; at most ``max_waiting`` wait; the rest get 429 at once."""

    def __init__(self, max_running: int, max_waiting: int, metrics: ServerMetrics):
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = self.waiting = 0
        self._metrics = metrics

    def reserve(self, choices: int, param: str = "n") -> None:
        """Take ``choices`` places in the line now, or refuse (400 naming ``param`` past ``max_running``, else 429).

        Each place is given back by :meth:`slot` (or :meth:`release` for a choice that never starts).
        """
        self.check_size(choices, param)
        if self.running + self.waiting + choices > self.max_running + self.max_waiting:
            raise APIError(429, "The server is at capacity (running and waiting requests are full); retry later.",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self._update(waiting=choices)

    def check_size(self, choices: int, param: str = "n") -> None:
        """400 naming ``param`` for a request of more choices than can ever run at once."""
        if choices > self.max_running:
            raise APIError(400, f"{param}: at most {self.max_running} choices per request on this server",
                           param=param)

    def release(self, choices: int) -> None:
        """Give back places of reserved choices that will not run."""
        self._update(waiting=-choices)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Run one reserved choice: wait for a running slot, holding its place in the line meanwhile."""
        try:
            await self._slots.acquire()
        finally:
            self._update(waiting=-1)
        self._update(running=1)
        try:
            yield
        finally:
            self._update(running=-1)
            self._slots.release()

    def _update(self, running: int = 0, waiting: int = 0) -> None:
        self.running += running
        self.waiting += waiting
        self._metrics.running.set(self.running)
        self._metrics.waiting.set(self.waiting)
