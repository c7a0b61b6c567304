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
  weight) hashing over replica *ranks*: the tie-break between equally loaded
  replicas, stable as replicas come and go (a replica that takes a departed
  one's rank takes its place in every order).

Hashes are sha256, never ``hash()``: every process that holds a handle runs
its own router, and they must agree.

Where a conversation starts is a choice of load, not of hash: hashing 16
conversations onto 2 replicas gave them 10 and 6, and the busier replica's
turns waited beside each other's (``bench/scale.py``). :class:`Placements`
sends a conversation it has not seen to the least loaded replica (ties to
the one holding fewest conversations, then to the rendezvous order, so
routers that saw nothing agree) and remembers where
it went; later turns follow it there, as SGLang's cache-aware router keeps a
conversation where its prefix is while the load is balanced.

Since the next turn comes back to the same replica, that replica can also
prefill its beginning while the user reads the answer:
:func:`next_turn_ids` are the ids the next prompt will have after this
one's (the answer as the chat format re-encodes it, then the next round's
start), known as soon as the answer ends.

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
from collections import Counter, OrderedDict
from typing import Callable, Hashable, List, Sequence

from ..prompts.chat_format import B_INST, E_INST, answer_text


def turn_end_ids(encode) -> tuple:
    """The ids that ``" [/INST]"`` becomes inside a prompt (``encode``: sentencepiece without BOS/EOS).

    Encoded after a word, as the chat format writes it (``f"{user} [/INST]"``),
    so the ids match the prompt's own.
    """
    word = encode("x")
    return tuple(encode(f"x {E_INST}")[len(word):])


def next_turn_ids(answer: str, encode, bos_id: int, eos_id: int) -> List[int]:
    """The ids that follow a chat prompt in its conversation's next prompt, once ``answer`` is its reply.

    Meta's format re-encodes the answer from its text (``f"{user} [/INST] {answer} "``,
    then EOS, BOS and the next ``[INST]``), which need not give the ids the
    model sampled. ``encode`` is sentencepiece without BOS/EOS; it splits at
    spaces, so the ids after ``[/INST]`` do not depend on the user text.

    Example:
        >>> import os, sentencepiece
        >>> from modelscope_llama2.constants import DEMO_DIR
        >>> from modelscope_llama2.prompts.chat_format import encode_dialog
        >>> encode = sentencepiece.SentencePieceProcessor(model_file=os.path.join(DEMO_DIR, "tokenizer.model")).encode
        >>> asked = [{"role": "user", "content": "Where?"}]
        >>> answered = asked + [{"role": "assistant", "content": " West Lake. "}, {"role": "user", "content": "When?"}]
        >>> prompt = encode_dialog(asked, encode, 1, 2)
        >>> following = encode_dialog(answered, encode, 1, 2)
        >>> following[:len(prompt)] == prompt
        True
        >>> ahead = next_turn_ids(" West Lake. ", encode, 1, 2)
        >>> following[len(prompt):len(prompt) + len(ahead)] == ahead
        True
    """
    after = encode(f"x {E_INST}")
    return [*encode(f"x {E_INST} {answer_text(answer)} ")[len(after):], eos_id, bos_id, *encode(B_INST)]


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


# Conversations a router remembers the replica of, least recently used forgotten first (a key and a replica
# id take ~250 bytes: at most ~16 MB).
PLACEMENTS_KEPT = 65536


class Placements:
    """Where each recent conversation went, and so where its next turn goes.

    :meth:`choose` keeps a conversation on its replica unless that replica is
    gone or has ``imbalance`` more requests than the least loaded one (then
    the conversation moves: the replica that answers it holds its latest
    prefix). A conversation not seen yet goes to the least loaded replica;
    between equally loaded ones, to the one holding fewest of the remembered
    conversations (on an idle moment every replica's load is 0, and the
    rendezvous order alone put 16 conversations on 4 replicas as 6/4/4/2).

    Example:
        >>> placements = Placements(imbalance=2)
        >>> load = {"a": 0, "b": 0}.get
        >>> placements.choose(b"chat 1", ["a", "b"], load)  # a tie: the first in rendezvous order
        'a'
        >>> placements.choose(b"chat 2", ["a", "b"], load)  # a tie of loads: the replica holding fewer
        'b'
        >>> load = {"a": 1, "b": 0}.get
        >>> placements.choose(b"chat 3", ["a", "b"], load), placements.choose(b"chat 1", ["b", "a"], load)
        ('b', 'a')
        >>> placements.choose(b"chat 1", ["a", "b"], {"a": 3, "b": 1}.get)  # 2 more than the least loaded
        'b'
        >>> placements.choose(b"chat 1", ["a"], load)  # its replica is gone
        'a'
    """

    def __init__(self, imbalance: int, capacity: int = PLACEMENTS_KEPT):
        self._imbalance = imbalance
        self._capacity = capacity
        self._where: "OrderedDict[bytes, Hashable]" = OrderedDict()
        self._held: "Counter[Hashable]" = Counter()  # remembered conversations per replica

    def choose(self, key: bytes, replicas: Sequence[Hashable], load: Callable[[Hashable], int]) -> Hashable:
        """The replica for the conversation ``key`` among ``replicas`` (in :func:`rank_order` for ``key``);
        ``load(replica)``: its requests."""
        least = min(replicas, key=lambda replica: (load(replica), self._held[replica]))  # the first of those
        home = self._where.pop(key, None)
        if home is not None:
            self._held[home] -= 1
        if home not in replicas or load(home) - load(least) >= self._imbalance:
            home = least
        self._where[key] = home
        self._held[home] += 1
        if len(self._where) > self._capacity:
            _, forgotten = self._where.popitem(last=False)
            self._held[forgotten] -= 1
        return home
