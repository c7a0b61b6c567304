"""Shared helpers for the benchmark scripts: threads, clocks, tables, verdicts.

Every script measures its baseline in the same process and run, then prints
a table and one ``PASS``/``FAIL`` line per target; these helpers keep the
output format the same across scripts.
"""

import argparse
import os
import platform
import statistics
import time
from typing import Callable, List, Sequence

import torch
from transformers.generation.streamers import BaseStreamer


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every CPU benchmark shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dir", default=None, help="checkpoint cache dir (default: ~/.cache/modelscope_llama2-bench)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure; the median is reported")
    return parser


def setup(threads: int) -> None:
    """Pin the thread count and quieten library warnings that would drown the tables."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Hub client: no cloud probes or network at import (everything here is local).
    os.environ.setdefault("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    print(machine_line())


def machine_line() -> str:
    """``nproc``, CPU model, torch/transformers versions and threads: the context of every figure."""
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # Other processes sharing the cores skew every figure: show the load.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"# machine: nproc={os.cpu_count()}, CPU={cpu}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, threads={torch.get_num_threads()}, load average {load}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class FirstTokenClock(BaseStreamer):
    """A ``generate()`` streamer noting when the first new token arrives.

    ``generate()`` hands the prompt to ``put`` first; the second ``put`` is
    the first generated token.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2 and self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class ForwardClock:
    """Notes the start time of every forward pass of a model (a context manager).

    Consecutive starts during decoding are one full step apart: forward,
    sampling, stopping criteria, streamer and whatever else runs per token.
    The median step is robust to other processes stealing the cores now and
    then, which end-to-end times are not.
    """

    def __init__(self, model):
        self.model = model
        self.starts: List[float] = []

    def __enter__(self) -> "ForwardClock":
        self.handle = self.model.register_forward_pre_hook(lambda *_: self.starts.append(time.perf_counter()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def decode_steps(self) -> List[float]:
        """Seconds between successive decode steps (the prefill pass excluded)."""
        decode = self.starts[1:]
        return [b - a for a, b in zip(decode, decode[1:])]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (readable in a terminal and in Markdown code blocks)."""
    cells: List[List[str]] = [list(map(str, headers))] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def verdict(name: str, value: float, target: str, ok: bool) -> bool:
    """Print one target line, e.g. ``PASS  decode ratio: 0.99 (target >= 0.95)``."""
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3f} (target {target})")
    return ok
