"""``POST /v1/chat/completions``: Meta-exact chat prompts, answered whole or as ``chat.completion.chunk`` events.

Example:
    >>> ChatHandler.__name__
    'ChatHandler'
"""

import time
from typing import Any, AsyncIterator, List, Optional

from fastapi import Request

from ...decoding import TextDelta
from ...prompts.chat_format import AnswerStream, answer_text
from ...prompts.prompt import Prompt
from ..generation import FINISH_REASONS, Choice, usage
from ..logprobs import TokenTexts, chat_logprobs
from ..protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                        ChatCompletionResponse, Delta)
from .base import Deltas, Handler, dialog_of, sse


class ChatHandler(Handler):
    """Chat completions: one prompt per choice from the request's messages."""

    async def create(self, body: ChatCompletionRequest, request: Request) -> Any:
        self.builder.check_model(body.model)
        dialog = dialog_of(body.messages)
        prompts = self.builder.chat(body, dialog, body.max_completion_tokens or body.max_tokens, body.n,
                                    truncate=body.truncation == "auto")

        tokens = TokenTexts(self.builder.tokenizer) if prompts[0].sampling.logprobs is not None else None

        def build(response_id: str, choices: List[Choice]) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=response_id, model=body.model,
                choices=[ChatChoice(index=i, message=AssistantMessage(content=answer_text("".join(c.text))),
                                    finish_reason=c.finish_reason,
                                    logprobs=chat_logprobs(tokens, c.logprobs) if tokens else None,
                                    token_ids=c.token_ids if body.return_token_ids else None)
                         for i, c in enumerate(choices)],
                usage=usage(len(prompts[0].token_ids), [c.final for c in choices if c.final]),
                prompt_token_ids=list(prompts[0].token_ids) if body.return_token_ids else None,
                dropped_rounds=dropped_rounds(body, prompts),
            )

        return await self.respond(body, request, prompts, "chatcmpl",
                                  lambda rid, deltas, with_usage: _chunks(body, prompts, rid, deltas, with_usage,
                                                                          tokens),
                                  build)


def dropped_rounds(body: ChatCompletionRequest, prompts: List[Prompt]) -> Optional[int]:
    """The extension field ``dropped_rounds``: how many oldest rounds ``truncation: "auto"`` left out (else absent)."""
    return prompts[0].dropped_rounds if body.truncation == "auto" else None


async def _chunks(body: ChatCompletionRequest, prompts: List[Prompt], response_id: str, deltas: Deltas,
                  include_usage: bool, tokens: Optional[TokenTexts]) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: List[ChatChunkChoice], **extra: Any) -> str:
        return sse(ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=choices, **extra))

    ids = list(prompts[0].token_ids) if body.return_token_ids else None
    yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                 for i in range(len(prompts))], prompt_token_ids=ids, dropped_rounds=dropped_rounds(body, prompts))
    finals: List[TextDelta] = []
    # The answer stripped at both ends, as chat() returns it.
    answers = [AnswerStream() for _ in prompts]
    # Ids and logprobs of tokens whose text is not shown yet go with the next chunk shown.
    pending_ids: List[List[int]] = [[] for _ in prompts]
    pending: List[list] = [[] for _ in prompts]
    async for index, delta in deltas:
        reason = FINISH_REASONS.get(delta.finish_reason, delta.finish_reason)
        shown = answers[index].feed(delta.text, final=reason is not None)
        pending_ids[index] += delta.token_ids
        pending[index] += delta.logprobs
        if shown or reason:
            token_ids = pending_ids[index] if body.return_token_ids else None
            logprobs = chat_logprobs(tokens, pending[index]) if tokens else None
            pending_ids[index], pending[index] = [], []
            yield chunk([ChatChunkChoice(index=index, delta=Delta(content=shown), finish_reason=reason,
                                         logprobs=logprobs, token_ids=token_ids)])
        if delta.finish_reason is not None:
            finals.append(delta)
    if include_usage:
        yield chunk([], usage=usage(len(prompts[0].token_ids), finals))
