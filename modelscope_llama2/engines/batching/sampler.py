"""Per-row sampling for the batching engine: every request its own settings and random generator.

One step's logits ``[rows, vocab]`` come in; each row is shaped by its own
request's settings (repetition/frequency/presence penalties, ``min_new_tokens``,
a grammar mask), then greedy rows take the argmax and sampled rows are
tempered, truncated (top-k, top-p, min-p) and drawn. A draw is
``argmax(probs / noise)`` with exponential noise from the row's own
``torch.Generator`` (the Gumbel-max trick vLLM uses too): a seeded request
draws the same numbers whatever else is in the batch, so it gives the same
tokens alone and inside a batch. Log-probabilities are of the raw logits
(before penalties, temperature or masks).

Example:
    >>> rows = [RowSampling(greedy=True), RowSampling(temperature=0.8, generator=seeded_generator(1, "cpu"))]
    >>> logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -9.0, -9.0]])
    >>> tokens, logprobs = sample(logits, rows, [None, None], [0, 0])
    >>> tokens
    [1, 0]
"""

import secrets
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from ...constants import EOS_ID
from ...prompts.prompt import SamplingParams
from ..base import TokenLogprob
from ..logits import penalize_row

# The transformers-style option names a row honours (SamplingParams.options).
ROW_OPTIONS = frozenset({
    "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "min_new_tokens",
    "frequency_penalty", "presence_penalty",
})
# Most likely tokens a row is drawn among when its top-k/top-p/min-p cut falls inside them, narrowest
# first (see _draw).
NUCLEUS_CANDIDATES = (64, 256)
# Settings a request leaves to the checkpoint's generation config when it does not set them.
CHECKPOINT_DEFAULTS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class RowSampling:
    """One request's sampling settings, resolved against the checkpoint's defaults."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    generator: Optional[torch.Generator] = None
    # A grammar matcher (engines/structured.py): fill_mask(scores_row) before the draw, accept(token) after.
    constraint: Any = None

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


def row_sampling(sampling: SamplingParams, defaults: Mapping[str, Any], device: Any) -> RowSampling:
    """The settings of one request: its options over the checkpoint's ``defaults``; a generator when it samples."""
    options = {**{k: v for k, v in defaults.items() if v is not None}, **sampling.options}
    temperature = float(options.get("temperature", 1.0) or 0.0)
    greedy = not options.get("do_sample", False) or temperature <= 0.0
    row = RowSampling(
        greedy=greedy, temperature=temperature, top_k=int(options.get("top_k") or 0),
        top_p=float(options.get("top_p", 1.0) or 1.0), min_p=float(options.get("min_p") or 0.0),
        repetition_penalty=float(options.get("repetition_penalty") or 1.0),
        frequency_penalty=float(options.get("frequency_penalty") or 0.0),
        presence_penalty=float(options.get("presence_penalty") or 0.0),
        min_new_tokens=int(options.get("min_new_tokens") or 0), ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs)
    if not greedy:
        row.generator = seeded_generator(sampling.seed, device)
    return row


def seeded_generator(seed: Optional[int], device: Any) -> torch.Generator:
    """A request's own generator: seeded by the request, or from the OS when it gives no seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def sample(logits: torch.Tensor, rows: Sequence[RowSampling], histories: Sequence[Optional[Tuple[torch.Tensor, int]]],
           counts: Sequence[int]) -> Tuple[List[int], List[Optional[TokenLogprob]]]:
    """The next token of every row, and its logprob where the row asked for them.

    ``histories[i]``: ``(ids so far, prompt length)`` for rows with penalties
    (None otherwise); ``counts[i]``: tokens the row has generated.
    """
    raw = logits.float()
    want = [i for i, row in enumerate(rows) if row.logprobs is not None]
    logp = torch.log_softmax(raw[want], dim=-1) if want else None
    scores = _shape(raw, rows, histories, counts)
    greedy = [i for i, row in enumerate(rows) if row.greedy]
    drawn = [i for i, row in enumerate(rows) if not row.greedy]
    # Whole-batch tensors when every row is of one kind: no copies of [rows, vocab] logits.
    if not drawn:
        ids = scores.argmax(dim=-1).tolist()
    elif not greedy:
        ids = _draw(scores, rows).tolist()
    else:
        tokens = torch.empty(len(rows), dtype=torch.long, device=raw.device)
        tokens[greedy] = scores[greedy].argmax(dim=-1)
        tokens[drawn] = _draw(scores[drawn], [rows[i] for i in drawn])
        ids = tokens.tolist()
    for row, token in zip(rows, ids):
        if row.constraint is not None:
            row.constraint.accept(token)
    logprobs: List[Optional[TokenLogprob]] = [None] * len(rows)
    if want:
        logprobs_of = _token_logprobs(logp, [ids[i] for i in want], [rows[i].logprobs for i in want])
        for i, item in zip(want, logprobs_of):
            logprobs[i] = item
    return ids, logprobs


def _shape(raw: torch.Tensor, rows: Sequence[RowSampling], histories: Sequence[Optional[Tuple[torch.Tensor, int]]],
           counts: Sequence[int]) -> torch.Tensor:
    """Penalties, the EOS ban of min_new_tokens and grammar masks, row by row (only rows that have them)."""
    touched = [i for i, row in enumerate(rows)
               if row.needs_history or counts[i] < row.min_new_tokens or row.constraint is not None]
    if not touched:
        return raw
    scores = raw.clone()
    for i in touched:
        row = rows[i]
        if row.needs_history:
            ids, prompt_len = histories[i]
            _penalize(scores[i], ids, prompt_len, row)
        if counts[i] < row.min_new_tokens and not row.ignore_eos:
            scores[i, EOS_ID] = float("-inf")
        if row.constraint is not None:
            row.constraint.fill_mask(scores[i])
    return scores


def _penalize(scores: torch.Tensor, ids: torch.Tensor, prompt_len: int, row: RowSampling) -> None:
    if row.repetition_penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor: prompt and answer
        seen = scores.gather(0, ids)
        scores.scatter_(0, ids, torch.where(seen < 0, seen * row.repetition_penalty, seen / row.repetition_penalty))
    if row.frequency_penalty or row.presence_penalty:  # OpenAI's: the answer's tokens only
        scores.copy_(penalize_row(scores, ids[prompt_len:], row.frequency_penalty, row.presence_penalty))


def _draw(scores: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """One token per row from its tempered, truncated distribution, with its own generator's noise.

    A row whose kept tokens (top-k, top-p, min-p) lie within its
    :data:`NUCLEUS_CANDIDATES` most likely ones (a trained model's usual
    case: the narrower widths first, as a top-64 costs a fifth of a top-256
    over 32,000 tokens on a CPU) is drawn among those; the rest over the
    whole vocabulary. Which path a row takes depends on that row alone, so a
    seeded request draws the same way alone and in a batch.
    """
    device, vocab = scores.device, scores.shape[1]
    temperature = torch.tensor([row.temperature for row in rows], device=device)
    probs = torch.softmax(scores / temperature[:, None], dim=-1)
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    left = list(range(len(rows)))  # rows not drawn yet
    for width in NUCLEUS_CANDIDATES:
        if not left:
            break
        candidates = (probs if len(left) == len(rows) else probs[left]).topk(min(width, vocab), dim=-1)
        keep = _kept_candidates(candidates.values, [rows[i] for i in left])
        cut_inside = (~keep[:, -1]).tolist()
        narrow = [j for j, i in enumerate(left)
                  if 0 < rows[i].top_k <= keep.shape[1] or (cut_inside[j] and _top_p_over_all(rows[i], vocab))]
        if len(narrow) == len(rows):  # every row at once (the usual case): no indexing
            values = candidates.values.masked_fill(~keep, 0.0)
            noise = _noise(rows, values.shape[1], device)
            return candidates.indices.gather(1, (values / noise).argmax(dim=-1, keepdim=True))[:, 0]
        if narrow:
            values = candidates.values[narrow].masked_fill(~keep[narrow], 0.0)
            noise = _noise([rows[left[j]] for j in narrow], values.shape[1], device)
            drawn = candidates.indices[narrow].gather(1, (values / noise).argmax(dim=-1, keepdim=True))[:, 0]
            tokens[[left[j] for j in narrow]] = drawn
            done = set(narrow)
            left = [i for j, i in enumerate(left) if j not in done]
    if left:
        truncated = _truncate(scores[left] / temperature[left, None], [rows[i] for i in left])
        noise = _noise([rows[i] for i in left], vocab, device)
        tokens[left] = (torch.softmax(truncated, dim=-1) / noise).argmax(dim=-1)
    return tokens


def _top_p_over_all(row: RowSampling, vocab: int) -> bool:
    """Whether the row's top-p is taken over the whole distribution (no top-k cut renormalises it first)."""
    return row.top_p >= 1.0 or not 0 < row.top_k < vocab


def _kept_candidates(values: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Which of each row's most likely tokens (``values``: probabilities, descending) top-k, top-p and min-p keep.

    The same rules as :func:`_truncate`, in the same order: top-p on the
    distribution renormalised after top-k.
    """
    device, width = values.device, values.shape[1]
    # Each rule's tensors only when some row has it (a step's sampler cost is mostly the count of tensor calls).
    if any(0 < row.top_k < width for row in rows):
        rank = torch.arange(width, device=device)[None, :]
        top_k = torch.tensor([row.top_k if 0 < row.top_k <= width else width for row in rows], device=device)
        keep = rank < top_k[:, None]
        kept = values.masked_fill(~keep, 0.0)
        # Over the top-k mass when top-k cut inside the candidates; over the whole distribution otherwise.
        mass = torch.where(top_k < width, kept.sum(dim=-1), torch.ones_like(top_k, dtype=values.dtype))
        before = (kept.cumsum(dim=-1) - kept) / mass[:, None]
    else:
        keep = torch.ones(values.shape, dtype=torch.bool, device=device)
        before = values.cumsum(dim=-1) - values
    if any(row.top_p < 1.0 for row in rows):
        top_p = torch.tensor([row.top_p if row.top_p < 1.0 else float("inf") for row in rows], device=device)
        keep &= before < top_p[:, None]
    if any(row.min_p > 0.0 for row in rows):
        keep &= values >= torch.tensor([row.min_p for row in rows], device=device)[:, None] * values[:, :1]
    return keep


def _noise(rows: Sequence[RowSampling], width: int, device: Any) -> torch.Tensor:
    """Exponential noise, ``width`` per row, each row from its own generator (Gumbel-max: argmax(p / noise)).

    ``-log(u)`` of uniform draws: the same distribution as ``exponential_``,
    whose CPU kernel costs 4-7x more per call (32,000 draws: 1.25 ms vs 0.3 ms).
    A draw of exactly 0 gives infinite noise: that token's ``p / noise`` is 0.
    """
    return torch.stack([torch.rand(width, device=device, generator=row.generator) for row in rows]).log_().neg_()


def _truncate(scores: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """top-k, top-p then min-p per row over the whole vocabulary, as transformers' warpers do them."""
    device, vocab = scores.device, scores.shape[1]
    if any(0 < row.top_k < vocab for row in rows):
        k = torch.tensor([row.top_k if 0 < row.top_k < vocab else vocab for row in rows], device=device)
        kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any(row.top_p < 1.0 for row in rows):
        top_p = torch.tensor([row.top_p for row in rows], device=device)
        ordered, order = scores.sort(dim=-1)
        remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)[:, None]
        remove[:, -1] = False
        scores = scores.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), float("-inf"))
    if any(row.min_p > 0.0 for row in rows):
        min_p = torch.tensor([row.min_p for row in rows], device=device)
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return scores


def _token_logprobs(logp: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> List[TokenLogprob]:
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(1).tolist()
    top_k = max(ks)
    top = logp.topk(top_k, dim=-1) if top_k else None
    top_values = top.values.tolist() if top is not None else [[] for _ in tokens]
    top_ids = top.indices.tolist() if top is not None else [[] for _ in tokens]
    return [TokenLogprob(token, value, tuple(zip(ids[:k], values[:k])))
            for token, value, ids, values, k in zip(tokens, chosen, top_ids, top_values, ks)]
