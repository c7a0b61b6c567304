"""The plain data that leaves the prompts layer: what to generate from, and how.

A :class:`Prompt` is everything an engine needs (token ids, sampling
settings, a request id) plus what the facade needs to shape the answer
(the user message, the history, the rounds dropped to fit). No closures, no
tensors: it can cross a thread, a process or a Ray hop unchanged.

Example:
    >>> p = Prompt(token_ids=(1, 518, 25580), sampling=SamplingParams(max_new_tokens=8))
    >>> p.sampling.max_new_tokens, len(p.request_id) > 0
    (8, True)
"""

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from .tools import ToolSpec

Kind = Literal["chat", "completion"]
StructuredKind = Literal["json_object", "json_schema", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the generated text must follow (constrained decoding).

    ``kind``: ``"json_object"`` (any JSON object; ``spec`` unused),
    ``"json_schema"`` (``spec`` is the schema as JSON text) or ``"grammar"``
    (``spec`` is an EBNF grammar as xgrammar and vLLM read it; what tool
    calls use). Plain strings, so the request stays plain data.
    """

    kind: StructuredKind
    spec: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: the new-token limit, stop strings, seed, and sampling options.

    ``options`` uses transformers' generation names (``do_sample``,
    ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
    ``min_new_tokens``, ...); each engine maps them to its own or refuses
    the ones it lacks (:meth:`~modelscope_llama2.engines.base.Engine.check_sampling`).
    """

    max_new_tokens: int
    stop: Tuple[str, ...] = ()
    seed: Optional[int] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    # Log-probabilities of the raw logits (before temperature, penalties or
    # grammar masks, as vLLM's default): None for none, k >= 0 for the chosen
    # token's plus the k most likely.
    logprobs: Optional[int] = None
    # The same for every prompt token after the first (what `echo` scores).
    prompt_logprobs: Optional[int] = None
    # Keep generating past EOS until max_new_tokens (vLLM's ignore_eos: fixed-length benchmarks).
    ignore_eos: bool = False
    structured: Optional[StructuredOutput] = None

    @property
    def greedy(self) -> bool:
        """Greedy for sure: ``do_sample`` is explicitly ``False``.

        Without it an engine falls back to the checkpoint's generation
        config, which may sample.
        """
        return self.options.get("do_sample") is False


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Prompt:
    """A validated request as token ids: what an engine generates from.

    ``decode_prefix``: ids decoded before the new ones, so a completion's
    first word keeps its leading space. ``message``: the user message a
    chat answers, or a completion's text. ``history``: the caller's
    (user, assistant) rounds, returned extended. ``dropped_rounds``: the
    oldest rounds left out so the prompt fits the context.
    """

    token_ids: Tuple[int, ...]
    sampling: SamplingParams
    request_id: str = field(default_factory=new_request_id)
    kind: Kind = "chat"
    message: str = ""
    history: Tuple[Tuple[str, str], ...] = ()
    dropped_rounds: int = 0
    decode_prefix: Tuple[int, ...] = ()
    echo: bool = False
    # The request's tools: the answer is in the tool-call format (prompts/tools.py), parsed back into calls.
    tools: Optional["ToolSpec"] = None
    # A prefill nobody waits for (the next turn's known beginning, to cache): an engine that schedules
    # runs it in the gaps between the requests someone waits for.
    background: bool = False
