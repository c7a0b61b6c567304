"""Which replica should answer a prompt: conversation keys and rendezvous ranking, without Ray.

Each chat turn re-sends the whole conversation, so the replica that answered
the previous turn holds most of the new prompt in its prefix cache. Sending
every turn of a conversation to that replica needs a key that is the same for
all its turns and differs between conversations:

* :func:`conversation_key` hashes the prompt ids up to the end of the first
  user message (the first ``[/INST]``). Later turns repeat those ids exactly
  (Meta's format re-encodes every round the same way), and two conversations
  that share one long system prompt still differ in their first user message,
  so they get different keys and spread over the replicas.
* :func:`rank_order` orders replicas for a key by rendezvous (highest random
  weight) hashing over replica *ranks*: when a replica goes, only its keys move
  (each to its own next choice), and the replica that takes its rank takes
  exactly those keys back.

Hashes are sha256, never ``hash()``: every process that holds a handle runs
its own router, and they must agree.

Example:
    >>> end = (518, 29914, 25580, 29962)  # what " [/INST]" encodes to in Llama 2's vocabulary
    >>> turn1 = (1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962)
    >>> turn2 = turn1 + (6324, 29991, 29871, 2, 1, 518, 25580, 29962, 1724)
    >>> conversation_key(turn1, end) == conversation_key(turn2, end)
    True
    >>> rank_order(conversation_key(turn1, end), [0, 1]) in ([0, 1], [1, 0])
    True
"""

import hashlib
from typing import Hashable, List, Sequence


def turn_end_ids(encode) -> tuple:
    """The ids that ``" [/INST]"`` becomes inside a prompt (``encode``: sentencepiece without BOS/EOS).

    Encoded after a word, as the chat format writes it (``f"{user} [/INST]"``),
    so the ids match the prompt's own.
    """
    from ..prompts.chat_format import E_INST

    word = encode("x")
    return tuple(encode(f"x {E_INST}")[len(word):])


def conversation_key(token_ids: Sequence[int], turn_end: Sequence[int]) -> bytes:
    """A digest of the prompt up to the end of its first user message (all of it when there is none)."""
    head = _through_first(token_ids, tuple(turn_end))
    return hashlib.sha256(",".join(map(str, head)).encode()).digest()


def rank_order(key: bytes, ranks: Sequence[Hashable]) -> List[Hashable]:
    """``ranks`` ordered best first for ``key`` (rendezvous hashing: stable as replicas come and go)."""
    return sorted(ranks, key=lambda rank: _weight(key, rank), reverse=True)


def _weight(key: bytes, rank: Hashable) -> bytes:
    return hashlib.sha256(key + repr(rank).encode()).digest()


def _through_first(token_ids: Sequence[int], pattern: tuple) -> Sequence[int]:
    n = len(pattern)
    if n:
        for start in range(len(token_ids) - n + 1):
            if tuple(token_ids[start:start + n]) == pattern:
                return token_ids[:start + n]
    return token_ids
