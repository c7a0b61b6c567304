"""``POST /v1/chat/completions``: Meta-exact chat prompts, answered whole or as ``chat.completion.chunk`` events.

Example:
    >>> ChatHandler.__name__
    'ChatHandler'
"""

import time
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

from fastapi import Request

from ...decoding import TextDelta
from ...prompts.chat_format import AnswerStream, answer_text
from ...prompts.prompt import Prompt
from ...prompts.tools import ToolOutputStream, parse_tool_output
from ..generation import FINISH_REASONS, Choice, usage
from ..logprobs import TokenTexts, chat_logprobs
from ..protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                        ChatCompletionResponse, Delta)
from .base import Deltas, Handler, built, dialog_of, sse


class ChatHandler(Handler):
    """Chat completions: one prompt per choice from the request's messages."""

    async def create(self, body: ChatCompletionRequest, request: Request) -> Any:
        self.builder.check_model(body.model)
        prompts = await built(request, lambda: self.builder.chat(
            body, dialog_of(body.messages), body.max_completion_tokens or body.max_tokens, body.n,
            truncate=body.truncation == "auto"))

        tokens = TokenTexts(self.builder.tokenizer) if prompts[0].sampling.logprobs is not None else None

        def build(response_id: str, choices: List[Choice]) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=response_id, model=body.model,
                choices=[ChatChoice(index=i, **answer(prompts[0], c),
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


def answer(prompt: Prompt, choice: Choice) -> Dict[str, Any]:
    """A choice's ``message`` and ``finish_reason``: the text, or with tools the calls (``tool_calls``)."""
    text = answer_text("".join(choice.text))
    if prompt.tools is None:
        return {"message": AssistantMessage(content=text), "finish_reason": choice.finish_reason}
    content, calls = parse_tool_output(text, prompt.tools)
    reason = "tool_calls" if calls and choice.finish_reason == "stop" else choice.finish_reason
    return {"message": AssistantMessage(content=content, tool_calls=[c.as_openai() for c in calls] or None),
            "finish_reason": reason}


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
    tools = [ToolOutputStream(p.tools) if p.tools is not None else None for p in prompts]
    async for index, delta in deltas:
        reason = FINISH_REASONS.get(delta.finish_reason, delta.finish_reason)
        shown = answers[index].feed(delta.text, final=reason is not None)
        pending_ids[index] += delta.token_ids
        pending[index] += delta.logprobs
        if tools[index] is not None:
            for piece in _tool_chunks(tools[index], shown, reason, index, delta):
                # As for text: the tokens not sent yet go with the next chunk sent, whatever it carries (the
                # tool-call JSON's tokens too), so the chunks' logprobs are the whole answer's, in order.
                if pending_ids[index]:
                    piece.logprobs = chat_logprobs(tokens, pending[index]) if tokens else None
                    piece.token_ids = pending_ids[index] if body.return_token_ids else None
                    pending_ids[index], pending[index] = [], []
                yield chunk([piece])
            if delta.finish_reason is not None:
                finals.append(delta)
            continue
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


def _tool_chunks(stream: ToolOutputStream, text: str, reason: Optional[str], index: int,
                 delta: TextDelta) -> Iterator[ChatChunkChoice]:
    """The chunks of an answer in the tool format: a plain answer's text as it grows; the calls, whole, at the end."""
    shown = stream.feed(text)
    if shown:
        yield ChatChunkChoice(index=index, delta=Delta(content=shown))
    if reason is None:
        return
    rest, calls = stream.finish()
    if rest:
        yield ChatChunkChoice(index=index, delta=Delta(content=rest))
    if calls:
        yield ChatChunkChoice(index=index, delta=Delta(tool_calls=[{"index": i, **call.as_openai()}
                                                                   for i, call in enumerate(calls)]))
    yield ChatChunkChoice(index=index, delta=Delta(), finish_reason="tool_calls" if calls and reason == "stop"
                          else reason)
