"""Reuse of KV caches across chat turns.

Turn N's prompt starts with turn N-1's prompt and (nearly all of) its answer,
which the model has already processed. A :class:`PromptCache` keeps the KV
caches of the last few generations with the token ids they hold; a new
prompt takes the entry sharing the longest prefix with it, so only the rest
is prefilled.

* An entry is checked out for the length of one generation and checked back
  in afterwards, so two threads never write to one cache.
* An entry whose whole prompt starts the new prompt (its conversation going
  on; the answer part may differ where the re-encoded answer tokenizes
  otherwise than generated) is taken. One that diverges inside its prompt
  (an edited or truncated history, another conversation with the same
  system prompt) is copied up to the common prefix (only that prefix is
  copied, counted against ``max_bytes``) and stays for its own conversation.
* Entries are evicted least recently used first, beyond ``max_entries`` or
  ``max_bytes`` of KV tensors.
"""

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

# Room for one full 4096-token conversation of any Llama 2 size in fp16
# (13B: 0.78 MiB a token); None means no byte bound.
DEFAULT_MAX_BYTES = 4 << 30


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0


class PromptCache:
    """An LRU of ``(token ids, KV cache)`` entries, safe to share between threads.

    Example:
        >>> cache = PromptCache(max_entries=2)
        >>> cache.checkout([1, 2, 3]) is None
        True
    """

    def __init__(self, max_entries: int = 4, max_bytes: Optional[int] = DEFAULT_MAX_BYTES):
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 0:
            raise ValueError(f"max_entries: expected a non-negative int, got {max_entries!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes: expected a non-negative int or None, got {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        # key -> (token ids the cache holds, cache, bytes, length of the prompt part)
        self._entries: "OrderedDict[int, Tuple[Tuple[int, ...], Any, int, int]]" = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of KV tensors held by the entries not checked out."""
        with self._lock:
            return sum(entry[2] for entry in self._entries.values())

    def clear(self) -> None:
        """Drop every entry (caches checked out right now are not affected)."""
        with self._lock:
            self._entries.clear()

    def checkout(self, prompt_ids: Sequence[int]) -> Optional[Tuple[Any, int]]:
        """A KV cache holding a prefix of ``prompt_ids``, and that prefix's length.

        The cache is the caller's until :meth:`checkin`. At least the last
        prompt token is left uncached, since generation needs one input.
        Returns ``None`` when no entry shares a prefix.
        """
        if not self.enabled:
            return None
        with self._lock:
            self.stats.lookups += 1
            best_key, best_len = None, 0
            for key, (ids, *_) in self._entries.items():
                shared = common_prefix_length(ids, prompt_ids)
                if shared > best_len:
                    best_key, best_len = key, shared
            usable = min(best_len, len(prompt_ids) - 1)
            if best_key is None or usable <= 0:
                return None
            ids, cache, nbytes, prompt_len = self._entries[best_key]
            copy_bytes = nbytes * usable // max(len(ids), 1)
            if usable >= prompt_len or not self._make_room(copy_bytes, keep=best_key):
                del self._entries[best_key]  # taken whole (and cropped below)
            else:
                cache = _prefix_copy(cache, usable)
                self._entries.move_to_end(best_key)
            self.stats.hits += 1
            self.stats.reused_tokens += usable
        _crop(cache, usable)
        return cache, usable

    def checkin(self, token_ids: Sequence[int], cache: Any, prompt_len: int) -> None:
        """Keep ``cache``, which holds the KV of ``token_ids[:cache length]``; the first ``prompt_len`` were the prompt."""
        if not self.enabled or cache is None:
            return
        length = cache.get_seq_length()
        entry = (tuple(token_ids[:length]), cache, _nbytes(cache), prompt_len)
        with self._lock:
            self._entries[self._next_key] = entry
            self._next_key += 1
            while self._entries and (len(self._entries) > self.max_entries or self._over_bytes()):
                self._entries.popitem(last=False)

    def _make_room(self, extra: int, keep: int) -> bool:
        """Evict other entries until ``extra`` more bytes fit the cap; False if only evicting ``keep`` would do."""
        if self.max_bytes is None:
            return True
        for key in [k for k in self._entries if k != keep]:  # least recently used first
            if sum(entry[2] for entry in self._entries.values()) + extra <= self.max_bytes:
                break
            del self._entries[key]
        return sum(entry[2] for entry in self._entries.values()) + extra <= self.max_bytes

    def _over_bytes(self) -> bool:
        return self.max_bytes is not None and sum(entry[2] for entry in self._entries.values()) > self.max_bytes


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (what a cached KV can serve of a new prompt)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _prefix_copy(cache: Any, length: int) -> Any:
    """A copy of ``cache`` holding its first ``length`` tokens only (the shared prefix, never the whole cache)."""
    # deepcopy takes each key/value tensor from the memo: a clone of its prefix.
    memo = {id(t): t[..., :length, :].clone() for layer in cache.layers for t in (layer.keys, layer.values)
            if t is not None}
    return copy.deepcopy(cache, memo)


def _crop(cache: Any, length: int) -> None:
    # transformers 5 crops by a negative count of tokens to remove.
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _nbytes(cache: Any) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
