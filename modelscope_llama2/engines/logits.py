"""Torch pieces every engine shares: raw log-probabilities and OpenAI's frequency/presence penalties.

Pure functions on one row of logits (a ``[vocab]`` tensor) so that any
engine can call them per request, whatever it batches with what; the
:class:`PenaltyLogitsProcessor` applies the penalties inside transformers'
``generate()``, one row at a time.

Log-probabilities are always the model's own: ``log_softmax`` of the raw
logits, before temperature, penalties, top-k/top-p or grammar masks (what
vLLM reports by default), so a greedy and a sampled request give the same
number for the same token.

Example:
    >>> import torch
    >>> row = torch.tensor([2.0, 1.0, 0.0, 0.5])
    >>> entry = token_logprob(raw_logprobs(row), token_id=1, k=2)
    >>> entry.token_id, round(entry.logprob, 4), [(i, round(lp, 4)) for i, lp in entry.top]
    (1, -1.546, [(0, -0.546), (1, -1.546)])
    >>> penalize_row(row, torch.tensor([1, 1, 3]), frequency=0.5, presence=0.25).tolist()
    [2.0, -0.25, 0.0, -0.25]
"""

from typing import Optional, Sequence, Tuple

import torch
from transformers import LogitsProcessor

from .base import TokenLogprob


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension, in float32 whatever the model's dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprob(logprobs_row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The logprob of ``token_id`` in one ``[vocab]`` row of :func:`raw_logprobs`, and the ``k`` most likely.

    ``top`` holds ``(id, logprob)`` pairs, most likely first; ``k=0`` leaves it empty.
    """
    top: Tuple[Tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(logprobs_row, min(k, logprobs_row.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token_id), float(logprobs_row[token_id]), top)


def prompt_logprobs(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> Tuple[Optional[TokenLogprob], ...]:
    """Each prompt token's logprob given the tokens before it, from the ``[len, vocab]`` logits of one forward.

    The first token has nothing before it: ``None`` (as in vLLM and OpenAI's ``echo``).

    Example:
        >>> import torch
        >>> entries = prompt_logprobs(torch.zeros(3, 4), [1, 2, 3], k=0)
        >>> entries[0], [round(e.logprob, 4) for e in entries[1:]]
        (None, [-1.3863, -1.3863])
    """
    rows = raw_logprobs(logits[:-1])
    return (None, *(token_logprob(row, token, k) for row, token in zip(rows, token_ids[1:])))


def penalize_row(logits_row: torch.Tensor, output_ids: torch.Tensor, frequency: float,
                 presence: float) -> torch.Tensor:
    """OpenAI's penalties on one ``[vocab]`` row: ``- frequency * count - presence * (count > 0)``.

    ``output_ids``: the tokens generated so far (never the prompt's, as in
    OpenAI and vLLM). Returns a new row; the input is left as it was.
    """
    counts = torch.zeros_like(logits_row).scatter_add_(0, output_ids.to(logits_row.device),
                                                       torch.ones_like(output_ids, dtype=logits_row.dtype,
                                                                       device=logits_row.device))
    return logits_row - frequency * counts - presence * (counts > 0).to(logits_row.dtype)


class PenaltyLogitsProcessor(LogitsProcessor):
    """:func:`penalize_row` inside transformers' ``generate()``: counts the ids after the first ``prompt_length``.

    In a left-padded batch every row's prompt takes ``prompt_length``
    columns, so the generated ids start at the same column in each row.
    """

    def __init__(self, prompt_length: int, frequency: float = 0.0, presence: float = 0.0):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        return torch.stack([penalize_row(row, ids, self.frequency, self.presence)
                            for row, ids in zip(scores, generated)])

