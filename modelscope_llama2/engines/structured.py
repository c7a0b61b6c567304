"""Constrained decoding with xgrammar: only tokens that keep the output inside a grammar are allowed.

A :class:`~modelscope_llama2.prompts.prompt.StructuredOutput` (a JSON schema,
any JSON object, or an EBNF grammar) is compiled once per tokenizer and spec
(:class:`GrammarCompiler`, cached) into a grammar; each request gets its own
:class:`RequestGrammar` (an xgrammar matcher) that, at every step, fills a
bitmask of the allowed next tokens for its row and then accepts the token
chosen. JSON is compact (no whitespace between tokens: a small model cannot
loop on blanks) and the grammar only allows EOS once the value is complete,
so an answer ends ``eos`` when valid and ``length`` when cut.

Engines use it three ways:

* the transformers engine hands :class:`GrammarLogitsProcessor` (one
  grammar per batch row, ``None`` for a free row) to ``generate()``;
* the batching engine sets :class:`RequestGrammar` as a row's constraint and
  calls :meth:`RequestGrammar.fill_mask` on that row's scores, then
  :meth:`RequestGrammar.accept`;
* an engine that owns a batched step loop calls the per-row
  API itself: :func:`allocate_token_bitmask`, :meth:`RequestGrammar.fill_bitmask`
  for each constrained row (while the forward pass runs, if it likes),
  :func:`apply_token_bitmask` on the logits before sampling, then
  :meth:`RequestGrammar.accept` with the sampled token.

Example (the per-row API, on the demo checkpoint's vocabulary):
    >>> import json, torch
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from modelscope_llama2.prompts.prompt import StructuredOutput
    >>> compiler = compiler_for_vocab(os.path.join(DEMO_DIR, "tokenizer.model"), vocab_size=512)
    >>> schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    >>> grammar = compiler.request_grammar(StructuredOutput("json_schema", json.dumps(schema)))
    >>> bitmask = allocate_token_bitmask(2, 512)  # a batch of two rows; row 1 is free
    >>> logits = torch.zeros(2, 512)
    >>> grammar.fill_bitmask(bitmask, row=0)
    >>> apply_token_bitmask(logits, bitmask, rows=[0])
    >>> allowed = (logits[0] > float("-inf")).nonzero().flatten().tolist()
    >>> compiler.tokenizer.decode(allowed), bool((logits[1] == 0).all())
    ('{', True)
    >>> all(grammar.accept(t) for t in compiler.tokenizer.encode('{"n":42}')[1:])  # [1:]: after the "▁"
    True
    >>> grammar.fill_bitmask(bitmask, row=0)  # complete: only EOS is left
    >>> logits = torch.zeros(2, 512); apply_token_bitmask(logits, bitmask, rows=[0])
    >>> (logits[0] > float("-inf")).nonzero().flatten().tolist()
    [2]
"""

import functools
import json
import os
import threading
from typing import Any, List, Optional, Sequence

import torch
import xgrammar
from transformers import LogitsProcessor

from ..prompts.prompt import StructuredOutput
from ..prompts.structured import check_json_schema
from ..tokenizer import Llama2Tokenizer

# Compact JSON: no free whitespace, and no blank after ':' or ','.
JSON_SEPARATORS = (",", ":")


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled (bad JSON, unsupported schema keywords, bad grammar)."""


def vocabulary(tokenizer: Llama2Tokenizer) -> List[str]:
    """The sentencepiece pieces by id, control and unknown pieces empty (xgrammar's mark for special tokens).

    Otherwise ``<s>`` or ``<unk>`` would count as the text they spell.
    """
    sp = tokenizer.sp_model
    return ["" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(sp.vocab_size())]


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer (and model vocabulary size), with a cache.

    Build it with :func:`compiler_for_vocab` so the tokenizer info (a pass over
    the whole vocabulary) is built once per checkpoint. Safe to use from
    several threads.
    """

    def __init__(self, tokenizer: Llama2Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo(vocabulary(tokenizer), xgrammar.VocabType.BYTE_FALLBACK,
                                      vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id],
                                      add_prefix_space=True)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self._lock = threading.Lock()

    def compile(self, structured: StructuredOutput, where: str = "structured") -> "xgrammar.CompiledGrammar":
        """The compiled grammar of ``structured`` (cached); :class:`GrammarError` naming ``where`` if invalid."""
        return self._compile_cached(structured, where)

    @functools.lru_cache(maxsize=256)
    def _compile_cached(self, structured: StructuredOutput, where: str) -> "xgrammar.CompiledGrammar":
        text = ebnf_grammar(structured, where)
        try:
            with self._lock:  # one compile at a time: xgrammar already runs its own threads inside
                return self._compiler.compile_grammar(text)
        except (RuntimeError, ValueError) as error:
            raise GrammarError(f"{where}: cannot constrain decoding to this grammar: {_reason(error)}") from None

    def request_grammar(self, structured: StructuredOutput, where: str = "structured") -> "RequestGrammar":
        """A fresh matcher for one request."""
        return RequestGrammar(xgrammar.GrammarMatcher(self.compile(structured, where)), self.vocab_size)


def ebnf_grammar(structured: StructuredOutput, where: str = "structured") -> str:
    """The EBNF grammar (xgrammar's dialect, which vLLM's ``grammar=`` takes too) of a structured output.

    JSON schemas become compact JSON: no whitespace outside strings, only the
    declared properties (a tighter grammar is still valid under a schema that
    allows more). Every string excludes control characters and UTF-16
    surrogates, which xgrammar 0.2 lets through in length-bounded strings.

    Example:
        >>> [rule for rule in ebnf_grammar(StructuredOutput("json_schema", '{"enum": [1, 2]}')).splitlines()
        ...  if rule.startswith("root ")]
        ['root ::= (("1") | ("2"))']
    """
    if structured.kind == "grammar":
        return structured.spec
    if structured.kind == "json_object":
        schema, strict = {"type": "object"}, False
    elif structured.kind == "json_schema":
        try:
            schema, strict = json.loads(structured.spec), True
        except ValueError as error:
            raise GrammarError(f"{where}: the schema is not valid JSON ({error})") from None
        try:
            check_json_schema(schema, where)
        except ValueError as error:
            raise GrammarError(str(error)) from None
    else:
        raise GrammarError(f"{where}: unknown structured-output kind {structured.kind!r}")
    try:
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                                    separators=JSON_SEPARATORS, strict_mode=strict)
    except (RuntimeError, ValueError) as error:
        raise GrammarError(f"{where}: cannot constrain decoding to this JSON schema: {_reason(error)}") from None
    return _safe_string_characters(str(grammar))


# xgrammar's character classes for JSON string contents, and what they should be.
_STRING_CHARACTERS = (r'[^\0-\x1f\"\\\r\n]', r'[^\"\\\r\n]')
_SAFE_STRING_CHARACTERS = r'[^\0-\x1f\"\\\ud800-\udfff]'


def _safe_string_characters(ebnf: str) -> str:
    for characters in _STRING_CHARACTERS:
        ebnf = ebnf.replace(characters, _SAFE_STRING_CHARACTERS)
    return ebnf


def _reason(error: Exception) -> str:
    # xgrammar's messages start with a C++ source location; keep the reason only.
    return str(error).strip().splitlines()[-1].split(": ", 1)[-1]


@functools.lru_cache(maxsize=8)
def compiler_for_vocab(vocab_file: str, vocab_size: int) -> GrammarCompiler:
    """The shared :class:`GrammarCompiler` of a checkpoint's ``tokenizer.model`` and model vocabulary size."""
    return GrammarCompiler(Llama2Tokenizer(vocab_file), vocab_size)


class RequestGrammar:
    """One request's grammar state: fill its row of the bitmask, then accept the sampled token.

    Once the grammar is complete only EOS is allowed; after EOS (or a token
    the grammar refused, e.g. the padding of a row stopped early) the row is
    :attr:`finished` and left unconstrained.
    """

    def __init__(self, matcher: "xgrammar.GrammarMatcher", vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.finished = False
        self._own_bitmask: Optional[torch.Tensor] = None

    def fill_mask(self, scores: torch.Tensor) -> None:
        """Set the disallowed tokens of one row's ``scores`` (1-D, in place) to ``-inf``; nothing once finished.

        The batching engine's per-row hook (``RowSampling.constraint``).
        """
        if self.finished:
            return
        if self._own_bitmask is None:
            self._own_bitmask = allocate_token_bitmask(1, self.vocab_size)
        self.fill_bitmask(self._own_bitmask, 0)
        apply_token_bitmask(scores.unsqueeze(0), self._own_bitmask)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (see :func:`allocate_token_bitmask`)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; ``False`` (and :attr:`finished`) if the grammar does not allow it."""
        if self.finished:
            return False
        accepted = self._matcher.accept_token(token_id)
        if not accepted or self._matcher.is_terminated():
            self.finished = True
        return accepted


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask for ``batch_size`` rows (int32, one bit per token), everything allowed."""
    return xgrammar.allocate_token_bitmask(batch_size, vocab_size)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[Sequence[int]] = None) -> None:
    """Set the logits of disallowed tokens to ``-inf`` in place, for ``rows`` (default: all rows).

    ``logits`` may be wider than the vocabulary (padded embeddings): the extra
    columns count as disallowed. The mask moves to the logits' device.
    """
    vocab = bitmask.shape[1] * 32
    if logits.shape[-1] > vocab:
        logits[..., vocab:] = float("-inf")
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=min(vocab, logits.shape[-1]),
                                         indices=list(rows) if rows is not None else None)


class GrammarLogitsProcessor(LogitsProcessor):
    """A transformers logits processor constraining each row of a ``generate()`` batch to its own grammar.

    ``grammars[i]`` is row ``i``'s :class:`RequestGrammar`, or ``None`` for a
    free row. It runs before temperature/top-k/top-p (transformers puts custom
    processors first), so sampling only ever sees allowed tokens.
    """

    def __init__(self, grammars: Sequence[Optional[RequestGrammar]], vocab_size: int):
        self.grammars = list(grammars)
        self.bitmask = allocate_token_bitmask(len(self.grammars), vocab_size)
        self._prompt_length: Optional[int] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        elif input_ids.shape[1] > self._prompt_length:  # every call after the first: accept the last tokens
            for grammar, token in zip(self.grammars, input_ids[:, -1].tolist()):
                if grammar is not None:
                    grammar.accept(token)
        rows = self._constrained_rows()
        if rows:
            for row in rows:
                self.grammars[row].fill_bitmask(self.bitmask, row)
            apply_token_bitmask(scores, self.bitmask, rows)
        return scores

    def _constrained_rows(self) -> List[int]:
        return [i for i, grammar in enumerate(self.grammars) if grammar is not None and not grammar.finished]


def grammar_compiler(model: Any, vocab_file: Optional[str] = None) -> GrammarCompiler:
    """The :class:`GrammarCompiler` of a loaded model: its ``tokenizer.model`` (``vocab_file`` or the one
    beside its weights) and its vocabulary size."""
    vocab_file = vocab_file or vocab_file_of(model)
    if vocab_file is None:
        raise ValueError("response_format: structured output needs the checkpoint's tokenizer.model beside "
                         "the model's weights")
    return compiler_for_vocab(vocab_file, model.config.vocab_size)


def vocab_file_of(model: Any) -> Optional[str]:
    """The ``tokenizer.model`` beside a loaded model's weights, if it has one."""
    for directory in (getattr(model, "model_dir", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if isinstance(directory, str) and os.path.isfile(os.path.join(directory, "tokenizer.model")):
            return os.path.join(directory, "tokenizer.model")
    return None
