"""One continuous-batching engine for every request: per-row sampling, KV slots, prefix reuse."""

from .engine import BatchingEngine

__all__ = ["BatchingEngine"]
