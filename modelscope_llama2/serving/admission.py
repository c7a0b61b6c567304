"""Admission: a bounded number of running choices, a bounded waiting line, 429 past it.

Example:
    >>> from modelscope_llama2.serving.metrics import ServerMetrics
    >>> admission = Admission(max_running=2, max_waiting=1, metrics=ServerMetrics())
    >>> admission.check(2)
    >>> admission.check(3)
    Traceback (most recent call last):
    ...
    modelscope_llama2.serving.errors.APIError: n: at most 2 choices per request on this server
"""

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from .errors import APIError
from .metrics import ServerMetrics


class Admission:
    """At most ``max_running`` choices generate; at most ``max_waiting`` wait; the rest get 429 at once."""

    def __init__(self, max_running: int, max_waiting: int, metrics: ServerMetrics):
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = self.waiting = 0
        self._metrics = metrics

    def check(self, choices: int) -> None:
        """Refuse a request of ``choices`` choices that would overflow the waiting line."""
        if choices > self.max_running:
            raise APIError(400, f"n: at most {self.max_running} choices per request on this server", param="n")
        free = self.max_running - self.running - self.waiting
        if choices > free and self.waiting + choices - max(free, 0) > self.max_waiting:
            raise APIError(429, "The server is at capacity (running and waiting requests are full); retry later.",
                           type="rate_limit_error", code="rate_limit_exceeded")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self._update(waiting=1)
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
