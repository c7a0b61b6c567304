"""``POST /v1/completions``: text or token-id prompts, answered whole or as ``text_completion`` events.

Example:
    >>> after_last_special([1, 5, 2, 7, 8], special=[1, 2])
    3
"""

import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from fastapi import Request

from ...decoding import TextDelta
from ...prompts.prompt import Prompt
from ...prompts.structured import parse_response_format
from ..errors import APIError
from ..generation import FINISH_REASONS, Choice, usage
from ..logprobs import LegacyLogprobs, TokenTexts
from ..protocol import CompletionChoice, CompletionRequest, CompletionResponse
from .base import Deltas, Handler, built, refuse_unsupported, sse, too_long, vocabulary_checked


class CompletionHandler(Handler):
    """Completions: one prompt per (prompt, choice), ``prompt[0]``'s n choices first, as OpenAI orders them."""

    async def create(self, body: CompletionRequest, request: Request) -> Any:
        self.builder.check_model(body.model)
        rows = 1 if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)) \
            else len(body.prompt)
        self.generation.admission.check_size(rows * body.n, "n" if rows == 1 else "prompt")  # before encoding them
        prompts = await built(request, lambda: self.prompts(body))

        def build(response_id: str, choices: List[Choice]) -> CompletionResponse:
            return CompletionResponse(
                id=response_id, model=body.model,
                choices=[self._choice(body, p, i, "".join(c.text), c.finish_reason, c.token_ids, self._logprobs(body, p, c))
                         for i, (p, c) in enumerate(zip(prompts, choices))],
                usage=usage(sum(len(p.token_ids) for p in prompts[::body.n]), [c.final for c in choices if c.final]),
            )

        return await self.respond(body, request, prompts, "cmpl",
                                  lambda rid, deltas, with_usage: self._chunks(body, prompts, rid, deltas,
                                                                               with_usage),
                                  build)

    def prompts(self, request: CompletionRequest) -> List[Prompt]:
        refuse_unsupported(request)
        builder, context = self.builder, self.builder.context
        try:
            structured = parse_response_format(request.response_format)
        except (TypeError, ValueError) as error:
            raise APIError(400, str(error), param="response_format") from None
        prompts = []
        for text, ids in self._ids(request.prompt):
            if len(ids) + (request.max_tokens or 1) > context:
                raise too_long(len(ids), request.max_tokens, context - (request.max_tokens or 1), context,
                               param="prompt")
            sampling = builder.sampling(request, context - len(ids) if request.max_tokens is None else request.max_tokens,
                                        structured)
            # Decoded before the new ids (specials left out), so the first new word keeps its space.
            prefix = tuple(ids[after_last_special(ids, builder.tokenizer.all_special_ids):])
            prompts += [Prompt(tuple(ids), builder.seeded(sampling, i), kind="completion", decode_prefix=prefix,
                               echo=request.echo, message=text) for i in range(request.n)]
        return prompts

    def _ids(self, prompt: Any) -> List[Tuple[str, List[int]]]:
        """``(text, ids)`` of each prompt: BOS + the text's ids, or token ids as given (text ``''``)."""
        tokenizer = self.builder.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        rows = []
        for row in prompt:
            if isinstance(row, str):
                rows.append((row, [tokenizer.bos_token_id, *tokenizer.encode(row)]))
                continue
            if not row:
                raise APIError(400, "prompt: an empty list of token ids", param="prompt")
            # ids taken as given (no BOS added), as OpenAI and vLLM do
            rows.append(("", vocabulary_checked(row, tokenizer.vocab_size, "prompt")))
        return rows

    def _logprobs(self, body: CompletionRequest, prompt: Prompt, choice: Choice) -> Optional[LegacyLogprobs]:
        """The choice's legacy logprobs (the prompt's first with ``echo``), when asked for."""
        if body.logprobs is None:
            return None
        legacy = self._legacy(body, prompt, choice.prompt_logprobs)
        legacy.add(choice.logprobs)
        return legacy

    def _legacy(self, body: CompletionRequest, prompt: Prompt, prompt_logprobs: Any) -> LegacyLogprobs:
        legacy = LegacyLogprobs(TokenTexts(self.builder.tokenizer))
        if body.echo and prompt_logprobs is not None:
            legacy.add(prompt_logprobs, prompt.token_ids)
        return legacy

    def _choice(self, body: CompletionRequest, prompt: Prompt, index: int, text: str,
                finish_reason: Optional[str], token_ids: List[int],
                legacy: Optional[LegacyLogprobs] = None) -> CompletionChoice:
        if body.echo and text is not None:
            text = self._prompt_text(prompt) + text
        return CompletionChoice(index=index, text=text, finish_reason=finish_reason,
                                logprobs=legacy.model() if legacy else None,
                                token_ids=token_ids if body.return_token_ids else None,
                                prompt_token_ids=list(prompt.token_ids) if body.return_token_ids else None)

    def _prompt_text(self, prompt: Prompt) -> str:
        """What ``echo`` puts before the completion: the prompt as sent, or its ids decoded."""
        return prompt.message or self.builder.tokenizer.decode(prompt.token_ids, skip_special_tokens=True)

    async def _chunks(self, body: CompletionRequest, prompts: List[Prompt], response_id: str, deltas: Deltas,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        echoed = set()
        finals: List[TextDelta] = []
        # Per choice, logprobs not sent yet (they go with the next chunk that has text or a finish).
        legacy: Dict[int, LegacyLogprobs] = {}
        async for index, delta in deltas:
            reason = FINISH_REASONS.get(delta.finish_reason, delta.finish_reason)
            text = delta.text
            if body.echo and index not in echoed:
                echoed.add(index)
                text = self._prompt_text(prompts[index]) + text
            if body.logprobs is not None:
                if index not in legacy:
                    legacy[index] = self._legacy(body, prompts[index], delta.prompt_logprobs)
                legacy[index].add(delta.logprobs)
            if text or reason:
                choice = CompletionChoice(index=index, text=text, finish_reason=reason,
                                          logprobs=legacy[index].take() if index in legacy else None,
                                          token_ids=list(delta.token_ids) if body.return_token_ids else None)
                yield sse(CompletionResponse(id=response_id, created=created, model=body.model, choices=[choice]))
            if delta.finish_reason is not None:
                finals.append(delta)
        if include_usage:
            use = usage(sum(len(p.token_ids) for p in prompts[::body.n]), finals)
            yield sse(CompletionResponse(id=response_id, created=created, model=body.model, choices=[], usage=use))


def after_last_special(ids: Sequence[int], special: Sequence[int]) -> int:
    """The index after the last special token in ``ids`` (0 when there is none)."""
    positions = [i for i, t in enumerate(ids) if t in special]
    return positions[-1] + 1 if positions else 0
