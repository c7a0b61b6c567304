"""Intra-op threads per forward pass on a CPU, chosen by timing the steps themselves.

A batch of a few rows makes small matrix products. On a CPU with other work
on its cores, splitting each of them over the OpenMP team costs more than it
saves: the team waits at every barrier for a thread the OS has not
scheduled. Measured on a shared 2-core box, one ``[8, 128] x [128, 352]``
product takes 15 us on one thread and 70-1000 us on two; a decode step of
the 2-layer demo checkpoint at batch 8 is 2-3x faster on one. A large
prompt chunk, or a bigger model on idle cores, gains from the whole team.
Neither is known in advance, so each kind of step (decode or prefill, by
token count) is timed with both settings and runs with the faster one;
the slower one is tried again once :data:`RETRY_SECONDS` have passed since
its last try, so a change in the machine's load moves the choice. A try that
loses again doubles that kind's wait for the next one (up to
:data:`MAX_RETRY_SECONDS`): a stalled try of the whole team on busy cores costs
several times a one-thread step, and a batch of 1 to 8 rows plus prompt
chunks makes about eight kinds of step, each trying once a second otherwise.

``torch.set_num_threads`` is process-wide: the engine sets the chosen count
around its own forward pass and puts the previous one back after.

Example:
    >>> chooser = ThreadChooser(max_threads=2)
    >>> decode_at_8 = (True, 4)
    >>> chooser.threads_for(decode_at_8)  # untried settings first
    1
    >>> chooser.record(decode_at_8, 1, 0.002)
    >>> chooser.threads_for(decode_at_8)
    2
    >>> chooser.record(decode_at_8, 2, 0.005)
    >>> chooser.threads_for(decode_at_8)  # the faster one from now on
    1
"""

import contextlib
import time
from typing import Dict, Iterator, List, Tuple

import torch

# Seconds between two tries of the setting not chosen, per kind of step: at first, and at most (after
# tries that lost, each doubling the wait).
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 16.0
# Weight of the newest timing in a setting's running average.
SMOOTHING = 0.2


class ThreadChooser:
    """Per kind of step: a running average of step seconds on one thread and on ``max_threads``; the faster runs."""

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self._options: Tuple[int, ...] = (1, max_threads) if max_threads > 1 else (max_threads,)
        self._seconds: Dict[Tuple[bool, int], List[float]] = {}  # kind -> average step seconds per option
        self._tried: Dict[Tuple[bool, int], List[float]] = {}  # kind -> when each option last ran (monotonic)
        self._wait: Dict[Tuple[bool, int], float] = {}  # kind -> seconds from a try of the slower to the next

    def threads_for(self, kind: Tuple[bool, int]) -> int:
        """Threads the next step of ``kind`` runs with: each untried setting first, then the faster one."""
        seconds = self._seconds.setdefault(kind, [0.0] * len(self._options))
        untried = [i for i, s in enumerate(seconds) if s == 0.0]
        if untried:
            return self._options[untried[0]]
        best = min(range(len(seconds)), key=seconds.__getitem__)
        other = (best + 1) % len(seconds)
        retry = time.monotonic() - self._tried[kind][other] >= self._wait.get(kind, RETRY_SECONDS)
        return self._options[other if retry else best]

    def record(self, kind: Tuple[bool, int], threads: int, seconds: float) -> None:
        """A step of ``kind`` took ``seconds`` on ``threads`` threads."""
        averages = self._seconds.setdefault(kind, [0.0] * len(self._options))
        tried = self._tried.setdefault(kind, [0.0] * len(self._options))
        i = self._options.index(threads)
        # The setting in use is averaged; a retried one starts afresh (its old timings are from another load).
        in_use = averages[i] != 0.0 and averages[i] == min(a for a in averages if a != 0.0)
        retried = averages[i] != 0.0 and not in_use
        averages[i] = (1 - SMOOTHING) * averages[i] + SMOOTHING * seconds if in_use else seconds
        tried[i] = time.monotonic()
        if retried:
            lost = averages[i] > min(averages)
            self._wait[kind] = min(2 * self._wait.get(kind, RETRY_SECONDS), MAX_RETRY_SECONDS) if lost \
                else RETRY_SECONDS

    @contextlib.contextmanager
    def step(self, tokens: int, decode: bool) -> Iterator[None]:
        """Run the block (one forward pass of ``tokens`` tokens) with the chosen thread count, and time it."""
        if len(self._options) == 1:
            yield
            return
        kind = (decode, tokens.bit_length())  # token counts within a factor of two share a choice
        threads = self.threads_for(kind)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            torch.set_num_threads(previous)
        self.record(kind, threads, elapsed)
