"""What every route shares: OpenAI requests to Meta-exact prompts, and the JSON-or-SSE answer.

:class:`RequestBuilder` is the one place a request becomes
:class:`~modelscope_llama2.prompts.prompt.Prompt` objects (sampling
options, stops, context budget, one prompt per choice); :class:`Handler`
runs them and answers either one JSON body or a stream of SSE chunks,
aborting the generation when the client goes away.

Example:
    >>> sse({"a": 1})
    'data: {"a": 1}\\n\\n'
"""

import asyncio
import json
import logging
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ...constants import SAMPLING_EPS
from ...decoding import TextDelta
from ...prompts.chat_format import PromptTooLong, encode_dialog
from ...prompts.prompt import Prompt, SamplingParams, StructuredOutput, new_request_id
from ...prompts.requests import chat_prompt, parse_chat_inputs
from ..backend import Backend, BackendUnavailable
from ..config import ServerConfig
from ..errors import APIError
from ..generation import Choice, Generation, collect
from ..metrics import ServerMetrics
from ..protocol import ErrorResponse

logger = logging.getLogger(__name__)

# Bodies up to this size (Content-Length) have their prompts built on the event loop: a hop to a worker thread
# and back (two wake-ups, the GIL handed over each way) costs more than encoding a few hundred tokens, and
# under load it was the largest share of a short request's server time.
INLINE_BUILD_BYTES = 4096
T = TypeVar("T")


async def built(request: Request, build: Callable[[], T]) -> T:
    """``build()`` for a request: on the event loop when its body is small, else in a worker thread (a huge
    dialog takes a while to read, fit and encode)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) <= INLINE_BUILD_BYTES:
        return build()
    return await asyncio.to_thread(build)


def sampling_options(request: Any, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """transformers-style options for an OpenAI request's temperature, top_p and penalties.

    ``temperature: 0`` (or below ``SAMPLING_EPS``, as vLLM) is greedy; an omitted temperature/top_p falls back to
    the checkpoint's defaults. Penalties are passed on only when non-zero, so
    an engine without them refuses them (400) rather than ignoring them.

    Example:
        >>> from types import SimpleNamespace as R
        >>> sampling_options(R(temperature=0.7, top_p=None, frequency_penalty=0, presence_penalty=0), {})
        {'do_sample': True, 'temperature': 0.7}
        >>> sampling_options(R(temperature=0, top_p=0.9, frequency_penalty=0, presence_penalty=0), {})
        {'do_sample': False}
        >>> sampling_options(R(temperature=1e-40, top_p=None, frequency_penalty=0, presence_penalty=0), {})
        {'do_sample': False}
    """
    # do_sample is always explicit: an engine would otherwise fall back to the
    # checkpoint's generation_config, which may sample where the request is greedy.
    options: Dict[str, Any] = {"do_sample": False}
    temperature = request.temperature
    if temperature is None and request.top_p is None and not defaults.get("do_sample", False):
        pass  # the checkpoint decodes greedily by default
    elif temperature is None or temperature >= SAMPLING_EPS:
        temperature = defaults.get("temperature", 1.0) if temperature is None else temperature
        top_p = defaults.get("top_p", 1.0) if request.top_p is None else request.top_p
        options["do_sample"] = True
        if temperature != 1.0:
            options["temperature"] = temperature
        if top_p != 1.0:
            options["top_p"] = top_p
    for penalty in ("frequency_penalty", "presence_penalty"):
        if getattr(request, penalty, 0):
            options[penalty] = getattr(request, penalty)
    options.update(vllm_options(request))
    return options


# vLLM's request extensions and the transformers-style options they set.
VLLM_EXTENSIONS = {"min_tokens": "min_new_tokens", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}


def vllm_options(request: Any) -> Dict[str, Any]:
    """vLLM's ``min_tokens``, ``top_k`` and ``repetition_penalty`` as options, when they change anything.

    Example:
        >>> from types import SimpleNamespace as R
        >>> vllm_options(R(min_tokens=4, top_k=-1, repetition_penalty=1.2))
        {'min_new_tokens': 4, 'top_k': 0, 'repetition_penalty': 1.2}
        >>> vllm_options(R(min_tokens=0, top_k=None, repetition_penalty=None))
        {}
    """
    options: Dict[str, Any] = {}
    if getattr(request, "min_tokens", 0):
        options["min_new_tokens"] = request.min_tokens
    if getattr(request, "top_k", None) is not None:
        options["top_k"] = max(request.top_k, 0)  # vLLM's -1 is transformers' 0: no top-k
    if getattr(request, "repetition_penalty", None) is not None:
        options["repetition_penalty"] = request.repetition_penalty
    return options


def logprobs_settings(request: Any) -> Dict[str, Any]:
    """``SamplingParams`` fields for a request's ``logprobs``: chat's bool + ``top_logprobs``, or completions' k.

    ``echo`` with logprobs also scores the prompt (``prompt_logprobs``).
    """
    logprobs = getattr(request, "logprobs", None)
    top = getattr(request, "top_logprobs", None)
    if isinstance(logprobs, bool) or logprobs is None and top is not None:  # chat
        if top is not None and not logprobs:
            raise APIError(400, "top_logprobs: needs \"logprobs\": true", param="top_logprobs")
        k = (top or 0) if logprobs else None
    else:
        k = logprobs
    echo = getattr(request, "echo", False) and k is not None
    return {"logprobs": k, "prompt_logprobs": k if echo else None}


def refuse_unsupported(request: Any) -> None:
    """400 for the request fields this server cannot honour, named."""
    if getattr(request, "logit_bias", None):
        raise APIError(400, "logit_bias: not supported by this server", param="logit_bias")
    if getattr(request, "suffix", None):
        raise APIError(400, "suffix: not supported by Llama 2", param="suffix")
    if (getattr(request, "best_of", None) or 1) != 1:
        raise APIError(400, "best_of: not supported by this server", param="best_of")


# More than OpenAI's 4, as vLLM takes: lm-eval's local-completions sends a task's every ``until`` string plus
# EOS (humaneval: 6). Matching costs O(new text) per stop string per token, so the count bounds the work.
MAX_STOP_STRINGS = 16


def stops(stop: Any) -> Tuple[str, ...]:
    """A request's ``stop`` as a tuple, checked."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(stops):
        raise APIError(400, "stop: stop strings must not be empty", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop sequences", param="stop")
    return stops


def too_long(prompt_tokens: int, max_tokens: Optional[int], budget: int, context: int,
             param: str = "messages") -> APIError:
    """OpenAI's ``context_length_exceeded`` error, with the numbers."""
    answer = context - budget
    return APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt takes "
                         f"{prompt_tokens} tokens and {answer} are kept for the completion "
                         f"({'max_tokens' if max_tokens else 'the default reserve'}), {prompt_tokens + answer} in "
                         "all. Please reduce the length of the messages or max_tokens"
                         + (", or send \"truncation\": \"auto\" to drop the oldest rounds." if param == "messages"
                            else "."), param=param, code="context_length_exceeded")


# Content part types that carry text: chat's ``text``, the Responses API's ``input_text``/``output_text``.
TEXT_PARTS = ("text", "input_text", "output_text")
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}


def dialog_of(messages: Sequence[Any], where: str = "messages", first_index: int = 0) -> List[Dict[str, str]]:
    """Client messages (``role``, ``content``) to a dialog of ``{role, content}`` strings: the one tolerant rule.

    ``developer`` is the system role; an assistant's ``content: null`` is an
    empty answer; text parts are joined; any other part (an image, audio, a
    file) is a 400 naming it, as the model takes text only. Keys without
    meaning for generation (``name``, ...) never reach the dialog.

    Example:
        >>> from types import SimpleNamespace as M
        >>> dialog_of([M(role="developer", content="Be brief."),
        ...            M(role="user", content=[{"type": "text", "text": "Hi"}]),
        ...            M(role="assistant", content=None), M(role="user", content="Again")])
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
         {'role': 'assistant', 'content': ''}, {'role': 'user', 'content': 'Again'}]
    """
    dialog = []
    for index, message in enumerate(messages, start=first_index):  # first_index: where they sit in the request
        role = ROLE_ALIASES.get(message.role, message.role)
        turn = {"role": role, "content": _text(message.content, role, f"{where}.{index}.content")}
        # Tool calls and results stay on the turn: the prompt builder renders them (prompts/tools.py).
        for key in ("tool_calls", "tool_call_id"):
            if getattr(message, key, None) is not None:
                turn[key] = getattr(message, key)
        dialog.append(turn)
    return dialog


def user_runs_joined(dialog: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``dialog`` with each run of consecutive ``user`` messages as one user turn, their texts joined by a blank line.

    Meta's format alternates user and assistant; OpenAI's API takes two user
    messages in a row, and clients send them: Open WebUI, after a turn that
    failed, sends the unanswered question again before the next one (a 400
    would end that chat for good). Joining them is what Anthropic's API does
    with consecutive turns of one role. The caller's messages are not changed.

    Example:
        >>> user_runs_joined([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Where?"}])
        [{'role': 'user', 'content': 'Hi\\n\\nWhere?'}]
    """
    turns: List[Dict[str, Any]] = []
    for message in dialog:
        if turns and message["role"] == "user" == turns[-1]["role"]:
            turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{message['content']}"}
        else:
            turns.append(message)
    return turns


def _text(content: Any, role: str, where: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise APIError(400, f"{where}: a {role} message needs content", param=where)
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        kind, text = (part.get("type"), part.get("text")) if isinstance(part, dict) else (part.type, part.text)
        if kind not in TEXT_PARTS:
            raise APIError(400, f"{where}.{index}: this model takes text only, not a part of type {kind!r}",
                           param=f"{where}.{index}")
        if not isinstance(text, str):
            raise APIError(400, f"{where}.{index}.text: a part of type {kind!r} needs its text",
                           param=f"{where}.{index}.text")
        texts.append(text)
    return "".join(texts)


# The request fields that constrain the answer, passed to the prompt builder as they came.
STRUCTURED_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")


def structured_inputs(request: Any) -> Dict[str, Any]:
    """The structured-output and tool fields a request set (``response_format`` ``text`` is no constraint)."""
    return {key: getattr(request, key) for key in STRUCTURED_FIELDS if getattr(request, key, None) is not None}


def _field_named(message: str, inputs: Mapping[str, Any]) -> str:
    """The request field an input error names (``messages`` unless it is about a structured field)."""
    for key in STRUCTURED_FIELDS:
        if message.startswith((f"inputs.{key}", f"inputs['{key}']")) and key in inputs:
            return key
    return "messages"


class RequestBuilder:
    """OpenAI requests to Meta-exact :class:`Prompt` objects: the one place every route builds them."""

    def __init__(self, backend: Backend, config: ServerConfig):
        self.tokenizer = backend.tokenizer
        self.context = backend.context_length
        self.backend = backend
        self.config = config
        self.defaults = config.default_sampling

    def check_model(self, name: str) -> None:
        if name != self.config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.config.served_model_name}`.", param="model", code="model_not_found")

    def chat(self, request: Any, dialog: List[Dict[str, str]], max_tokens: Optional[int], n: int = 1,
             truncate: bool = False, max_tokens_param: str = "max_tokens",
             structured: Optional[Dict[str, Any]] = None) -> List[Prompt]:
        """``n`` prompts for a dialog of ``{role, content}`` messages, with ``request``'s sampling.

        ``structured``: the ``response_format``/``tools`` fields in chat's
        shape (default: the request's own, as chat sends them).
        """
        refuse_unsupported(request)
        if max_tokens is not None and max_tokens >= self.context:
            raise APIError(400, f"{max_tokens_param}: {max_tokens} leaves no room for a prompt in this model's "
                                f"context of {self.context} tokens", param=max_tokens_param,
                           code="context_length_exceeded")
        inputs: Dict[str, Any] = {"messages": user_runs_joined(dialog),
                                  **(structured_inputs(request) if structured is None else structured)}
        if max_tokens is not None:
            inputs["max_new_tokens"] = max_tokens
        try:
            prompt = chat_prompt(parse_chat_inputs(inputs), self.tokenizer, self.context, truncate=truncate)
        except PromptTooLong as error:
            raise too_long(error.prompt_tokens, max_tokens, error.budget, self.context) from None
        except (TypeError, ValueError) as error:  # roles, order, control tags, tools, formats: named
            param = _field_named(str(error), inputs)
            message = str(error)[len("inputs."):] if param != "messages" and str(error).startswith("inputs.") else str(error)
            raise APIError(400, message, param=param) from None
        sampling = self.sampling(request, prompt.sampling.max_new_tokens, prompt.sampling.structured,
                                 "tools" if prompt.tools is not None else "response_format")
        return [replace(prompt, sampling=self.seeded(sampling, i), request_id=new_request_id()) for i in range(n)]

    def chat_ids(self, dialog: List[Dict[str, str]]) -> List[int]:
        """The Meta-exact ids of a whole dialog (no context budget): what ``/tokenize`` answers."""
        try:
            chat = parse_chat_inputs({"messages": user_runs_joined(dialog)})
        except (TypeError, ValueError) as error:
            raise APIError(400, str(error), param="messages") from None
        tokenizer = self.tokenizer
        return encode_dialog(chat.dialog, tokenizer.sp_model.encode, tokenizer.bos_token_id, tokenizer.eos_token_id)

    def sampling(self, request: Any, max_new_tokens: int, structured: Optional[StructuredOutput] = None,
                 structured_param: str = "response_format") -> SamplingParams:
        """``request``'s sampling, each option checked against the engine (400 naming the first it lacks).

        ``structured``: the grammar the answer must follow, compiled now so a
        schema the grammar engine refuses is a 400 naming ``structured_param``.
        """
        sampling = SamplingParams(max_new_tokens=max_new_tokens, stop=stops(getattr(request, "stop", None)),
                                  seed=getattr(request, "seed", None),
                                  options=sampling_options(request, self.defaults), structured=structured,
                                  ignore_eos=getattr(request, "ignore_eos", False), **logprobs_settings(request))
        request_names = {option: name for name, option in VLLM_EXTENSIONS.items()}
        for key, value in sampling.options.items():  # one by one, to name the field refused
            try:
                self.backend.check_sampling(SamplingParams(max_new_tokens, options={key: value}), "body")
            except ValueError:
                name = request_names.get(key, key)
                raise APIError(400, f"{name}: not supported by the {self.backend.engine_name} engine",
                               param=name) from None
        if structured is not None:
            try:
                self.backend.check_sampling(SamplingParams(max_new_tokens, structured=structured), structured_param)
            except ImportError:
                raise APIError(400, f"{structured_param}: structured outputs need xgrammar on the server "
                                    "(pip install 'modelscope_llama2[structured]')", param=structured_param) from None
            except ValueError as error:
                message = str(error).replace(f"{structured_param}['response_format']", structured_param)
                raise APIError(400, message, param=structured_param) from None
        return sampling

    @staticmethod
    def seeded(sampling: SamplingParams, choice: int) -> SamplingParams:
        # n choices with one seed: each its own reproducible stream, not n copies.
        if sampling.seed is None or choice == 0:
            return sampling
        return replace(sampling, seed=sampling.seed + choice)


def vocabulary_checked(ids: Sequence[int], vocab_size: int, param: str) -> List[int]:
    """``ids`` as a list, each checked to be in the vocabulary (400 naming the first that is not).

    Example:
        >>> vocabulary_checked([1, 31999], 32000, "tokens")
        [1, 31999]
    """
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                       param=param)
    return list(ids)


def sse(payload: Any, event: Optional[str] = None) -> str:
    """One server-sent event: a pydantic model (``None`` fields left out), a dict, or a plain string.

    ``event`` names it on an ``event:`` line, as the Responses API's stream does.
    """
    if isinstance(payload, str):
        data = payload
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload.model_dump_json(exclude_none=True)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


Deltas = AsyncIterator[Tuple[int, TextDelta]]


class Handler:
    """A route family's handler: builds prompts with :class:`RequestBuilder`, runs them, answers."""

    def __init__(self, builder: RequestBuilder, generation: Generation, metrics: ServerMetrics):
        self.builder, self.generation, self.metrics = builder, generation, metrics

    async def respond(self, body: Any, request: Request, prompts: List[Prompt], kind: str,
                      stream_chunks: Callable[[str, Deltas, bool], AsyncIterator[str]],
                      build: Callable[[str, List[Choice]], Any]) -> Any:
        """Generate ``prompts``; SSE chunks from ``stream_chunks`` or one response from ``build``."""
        response_id = f"{kind}-{uuid.uuid4().hex}"
        # Past the choice limit, name what made the request big: its n, or (completions) its list of prompts.
        deltas = self.generation.run(prompts, param="n" if len(prompts) == getattr(body, "n", 1) else "prompt",
                                     whole=not body.stream)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.streaming(stream_chunks(response_id, deltas, include_usage))
        choices = await self.until_disconnected(request, collect(deltas, len(prompts)))
        if choices is None:
            return self.client_gone()
        # Off the event loop: logprobs (echoed prompts' too) and long answers take a while to shape.
        answer = await asyncio.to_thread(lambda: build(response_id, choices).model_dump(exclude_none=True))
        self.metrics.requests.labels(status="200").inc()
        return answer

    @staticmethod
    async def until_disconnected(request: Request, work: Any) -> Optional[Any]:
        """Await ``work``; if the client goes away first, cancel it (which aborts its generation) and return None."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return None
        return task.result()

    def client_gone(self) -> Response:
        # nginx's 499: nobody reads this response, but the metrics count the aborted request.
        self.metrics.requests.labels(status="499").inc()
        return Response(status_code=499)

    def streaming(self, chunks: AsyncIterator[str], done: bool = True,
                  failed: Callable[[ErrorResponse], str] = lambda error: sse(error.model_dump_json())
                  ) -> StreamingResponse:
        """An SSE response of ``chunks``, ending with ``data: [DONE]`` (``done``) as OpenAI's chat streams do.

        A failure after the status line went out ends the stream with the event
        ``failed`` writes for OpenAI's error body (default: the body itself, as vLLM sends).
        """
        metrics = self.metrics

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except asyncio.CancelledError:  # the client went away; closing the chunks aborts its generation
                metrics.requests.labels(status="499").inc()
                raise
            except Exception as error:
                status, answer = _failure(error)
                metrics.requests.labels(status=str(status)).inc()
                yield failed(answer)
            else:
                metrics.requests.labels(status="200").inc()
            finally:
                await chunks.aclose()
            if done:
                yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _failure(error: Exception) -> Tuple[int, ErrorResponse]:
    """The status and OpenAI error body of a failure in the middle of a stream."""
    if isinstance(error, APIError):
        return error.status, error.body
    if isinstance(error, BackendUnavailable):  # replica gone, or the server's drain timeout passed
        return 503, ErrorResponse.of(f"The model is not available: {error}", "service_unavailable_error")
    logger.error("generation failed mid-stream", exc_info=error)  # the trace stays in the server's log
    return 500, ErrorResponse.of("The server failed while generating.", "server_error")
