"""The OpenAI-compatible HTTP app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

:func:`create_app` builds a FastAPI app over a
:class:`~modelscope_llama2.serving.backend.Backend`. The app turns each
request into Meta-exact :class:`~modelscope_llama2.prompts.prompt.Prompt`
objects (one per choice), admits them into a bounded number of running
slots with a bounded waiting line (429 past it), streams the backend's
text deltas back as OpenAI JSON or SSE chunks, and aborts a request whose
client goes away.

Safe by default: with an API key every route but ``/health`` needs
``Authorization: Bearer KEY`` (compared in constant time), bodies are capped
(413), and errors are OpenAI's error body, never a stack trace.

Example:
    >>> from modelscope_llama2.serving.backend import LocalBackend  # doctest: +SKIP
    >>> backend = LocalBackend(engine, tokenizer)  # doctest: +SKIP
    >>> app = create_app(backend, ServerConfig("llama-2-7b-chat", api_key="sk-1"))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding import TextDelta
from ..prompts.chat_format import PromptTooLong
from ..prompts.prompt import Prompt, SamplingParams, new_request_id
from ..prompts.requests import chat_prompt, parse_chat_inputs
from .backend import Backend, BackendUnavailable
from .metrics import ServerMetrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    UsageInfo,
)

logger = logging.getLogger(__name__)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True)
class ServerConfig:
    """What the app serves and its limits.

    ``default_sampling``: the checkpoint's ``generation_config`` settings
    (``do_sample``, ``temperature``, ``top_p``) used when a request leaves
    ``temperature``/``top_p`` out, as vLLM does. ``max_running``: choices
    generating at once; ``max_waiting``: choices queued behind them before
    new requests get 429.
    """

    served_model_name: str
    api_key: Optional[str] = None
    default_sampling: Mapping[str, Any] = field(default_factory=dict)
    max_running: int = 8
    max_waiting: int = 64
    max_body_bytes: int = 1 << 20


class APIError(Exception):
    """An error answered with OpenAI's error body and ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse.of(message, type, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def _error(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> JSONResponse:
    return APIError(status, message, type, param, code).response()


# -- admission: bounded running slots and a bounded waiting line ------------------


class Admission:
    """At most ``max_running`` choices generate; at most ``max_waiting`` wait; the rest get 429 at once."""

    def __init__(self, max_running: int, max_waiting: int, metrics: ServerMetrics):
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = self.waiting = 0
        self._metrics = metrics

    def check(self, choices: int) -> None:
        """Refuse a request of ``choices`` choices that would overflow the waiting line."""
        if choices > self.max_running:
            raise APIError(400, f"n: at most {self.max_running} choices per request on this server", param="n")
        free = self.max_running - self.running - self.waiting
        if choices > free and self.waiting + choices - max(free, 0) > self.max_waiting:
            raise APIError(429, "The server is at capacity (running and waiting requests are full); retry later.",
                           type="rate_limit_error", code="rate_limit_exceeded")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self._update(waiting=1)
        try:
            await self._slots.acquire()
        finally:
            self._update(waiting=-1)
        self._update(running=1)
        try:
            yield
        finally:
            self._update(running=-1)
            self._slots.release()

    def _update(self, running: int = 0, waiting: int = 0) -> None:
        self.running += running
        self.waiting += waiting
        self._metrics.running.set(self.running)
        self._metrics.waiting.set(self.waiting)


# -- ASGI middleware: API key and body cap ------------------------------------


class GuardMiddleware:
    """Checks the API key (every path but ``/health``) and caps the request body, before the app sees it."""

    def __init__(self, app: Any, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            # hmac.compare_digest: the time taken does not tell how much of a guessed key matched.
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _error(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                                    code="invalid_api_key")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        first: List[Dict[str, Any]] = []
        while more:  # read the whole (capped) body, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                first.append(message)
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}, *first]

        async def replayed() -> Dict[str, Any]:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        await _error(413, f"The request body is larger than {self.max_body_bytes} bytes.",
                     code="request_too_large")(scope, receive, send)


# -- requests to prompts ---------------------------------------------------------


def sampling_options(request: Any, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """transformers-style options for an OpenAI request's temperature, top_p and penalties.

    ``temperature: 0`` is greedy; an omitted temperature/top_p falls back to
    the checkpoint's defaults. Penalties are passed on only when non-zero, so
    an engine without them refuses them (400) rather than ignoring them.

    Example:
        >>> from types import SimpleNamespace as R
        >>> sampling_options(R(temperature=0.7, top_p=None, frequency_penalty=0, presence_penalty=0), {})
        {'do_sample': True, 'temperature': 0.7}
        >>> sampling_options(R(temperature=0, top_p=0.9, frequency_penalty=0, presence_penalty=0), {})
        {'do_sample': False}
    """
    # do_sample is always explicit: an engine would otherwise fall back to the
    # checkpoint's generation_config, which may sample where the request is greedy.
    options: Dict[str, Any] = {"do_sample": False}
    temperature = request.temperature
    if temperature is None and request.top_p is None and not defaults.get("do_sample", False):
        pass  # the checkpoint decodes greedily by default
    elif temperature != 0:
        temperature = defaults.get("temperature", 1.0) if temperature is None else temperature
        top_p = defaults.get("top_p", 1.0) if request.top_p is None else request.top_p
        options["do_sample"] = True
        if temperature != 1.0:
            options["temperature"] = temperature
        if top_p != 1.0:
            options["top_p"] = top_p
    for penalty in ("frequency_penalty", "presence_penalty"):
        if getattr(request, penalty):
            options[penalty] = getattr(request, penalty)
    return options


def _refuse_unsupported(request: Any) -> None:
    if request.logprobs or getattr(request, "top_logprobs", None):
        raise APIError(400, "logprobs: not supported by this server", param="logprobs")
    if request.logit_bias:
        raise APIError(400, "logit_bias: not supported by this server", param="logit_bias")
    if getattr(request, "suffix", None):
        raise APIError(400, "suffix: not supported by Llama 2", param="suffix")
    if (getattr(request, "best_of", None) or 1) != 1:
        raise APIError(400, "best_of: not supported by this server", param="best_of")


def _stops(stop: Any) -> Tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(stops):
        raise APIError(400, "stop: stop strings must not be empty", param="stop")
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", param="stop")
    return stops


def _too_long(prompt_tokens: int, max_tokens: Optional[int], budget: int, context: int,
              param: str = "messages") -> APIError:
    """OpenAI's ``context_length_exceeded`` error, with the numbers."""
    answer = context - budget
    return APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt takes "
                         f"{prompt_tokens} tokens and {answer} are kept for the completion "
                         f"({'max_tokens' if max_tokens else 'the default reserve'}), {prompt_tokens + answer} in "
                         "all. Please reduce the length of the messages or max_tokens"
                         + (", or send \"truncation\": \"auto\" to drop the oldest rounds." if param == "messages"
                            else "."), param=param, code="context_length_exceeded")


class PromptBuilder:
    """OpenAI requests to Meta-exact :class:`Prompt` objects, one per choice."""

    def __init__(self, backend: Backend, config: ServerConfig):
        self.tokenizer = backend.tokenizer
        self.context = backend.context_length
        self.backend = backend
        self.defaults = config.default_sampling

    def chat(self, request: ChatCompletionRequest) -> List[Prompt]:
        _refuse_unsupported(request)
        dialog = [{"role": message.role, "content": message.text()} for message in request.messages]
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and max_tokens >= self.context:
            raise APIError(400, f"max_tokens: {max_tokens} leaves no room for a prompt in this model's context of "
                                f"{self.context} tokens", param="max_tokens", code="context_length_exceeded")
        inputs: Dict[str, Any] = {"messages": dialog}
        if max_tokens is not None:
            inputs["max_new_tokens"] = max_tokens
        try:
            chat = parse_chat_inputs(inputs)
            prompt = chat_prompt(chat, self.tokenizer, self.context, truncate=request.truncation == "auto")
        except PromptTooLong as error:
            raise _too_long(error.prompt_tokens, max_tokens, error.budget, self.context) from None
        except (TypeError, ValueError) as error:  # roles, order, control tags: named by index
            raise APIError(400, str(error), param="messages") from None
        sampling = self._sampling(request, prompt.sampling.max_new_tokens)
        return [replace(prompt, sampling=self._seeded(sampling, i), request_id=new_request_id())
                for i in range(request.n)]

    def completion(self, request: CompletionRequest) -> List[Prompt]:
        """One prompt per (prompt, choice): ``prompt[0]``'s n choices first, as OpenAI orders them."""
        _refuse_unsupported(request)
        prompts = []
        for text, ids in self._completion_ids(request.prompt):
            if len(ids) + (request.max_tokens or 1) > self.context:
                raise _too_long(len(ids), request.max_tokens, self.context - (request.max_tokens or 1), self.context,
                                param="prompt")
            sampling = self._sampling(request, request.max_tokens or self.context - len(ids))
            # Decoded before the new ids (specials left out), so the first new word keeps its space.
            prefix = tuple(ids[_after_last_special(ids, self.tokenizer.all_special_ids):])
            prompts += [Prompt(tuple(ids), self._seeded(sampling, i), kind="completion", decode_prefix=prefix,
                               echo=request.echo, message=text) for i in range(request.n)]
        return prompts

    def _completion_ids(self, prompt: Any) -> List[Tuple[str, List[int]]]:
        """``(text, ids)`` of each prompt: BOS + the text's ids, or token ids as given (text ``''``)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        rows = []
        for row in prompt:
            if isinstance(row, str):
                rows.append((row, [self.tokenizer.bos_token_id, *self.tokenizer.encode(row)]))
                continue
            bad = [t for t in row if not 0 <= t < self.tokenizer.vocab_size]
            if not row or bad:
                what = f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.vocab_size - 1})" \
                    if bad else "an empty list of token ids"
                raise APIError(400, f"prompt: {what}", param="prompt")
            rows.append(("", list(row)))  # ids taken as given (no BOS added), as OpenAI and vLLM do
        return rows

    def _sampling(self, request: Any, max_new_tokens: int) -> SamplingParams:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, stop=_stops(request.stop), seed=request.seed,
                                  options=sampling_options(request, self.defaults))
        for key, value in sampling.options.items():  # one by one, to name the field refused
            try:
                self.backend.check_sampling(SamplingParams(max_new_tokens, options={key: value}), "body")
            except ValueError:
                raise APIError(400, f"{key}: not supported by the {self.backend.engine_name} engine",
                               param=key) from None
        return sampling

    @staticmethod
    def _seeded(sampling: SamplingParams, choice: int) -> SamplingParams:
        # n choices with one seed: each its own reproducible stream, not n copies.
        if sampling.seed is None or choice == 0:
            return sampling
        return replace(sampling, seed=sampling.seed + choice)


def _after_last_special(ids: Sequence[int], special: Sequence[int]) -> int:
    positions = [i for i, t in enumerate(ids) if t in special]
    return positions[-1] + 1 if positions else 0


# -- running choices -------------------------------------------------------------


class Generation:
    """Runs a request's prompts through the backend, admitted and measured, merged into one stream."""

    def __init__(self, backend: Backend, admission: Admission, metrics: ServerMetrics):
        self.backend, self.admission, self.metrics = backend, admission, metrics

    def run(self, prompts: List[Prompt]) -> AsyncIterator[Tuple[int, TextDelta]]:
        """``(choice index, delta)`` pairs as they come; closing the iterator aborts every unfinished choice.

        Raises :class:`APIError` (429) at once when the waiting line is full.
        """
        self.admission.check(len(prompts))
        return self._merged(prompts)

    async def _merged(self, prompts: List[Prompt]) -> AsyncIterator[Tuple[int, TextDelta]]:
        queue: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()

        async def pump(index: int, prompt: Prompt) -> None:
            arrived = time.perf_counter()  # TTFT includes the wait for a slot, as clients see it
            try:
                async with self.admission.slot():
                    await self._stream_one(index, prompt, queue, arrived)
            except Exception as error:  # re-raised in the consumer
                await queue.put((index, error))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_one(self, index: int, prompt: Prompt, queue: "asyncio.Queue", arrived: float) -> None:
        started = last = arrived
        first = True
        stream = self.backend.stream(prompt)
        try:
            async for delta in stream:
                now = time.perf_counter()
                if delta.token_ids:
                    if first:
                        self.metrics.ttft.observe(now - started)
                        first = False
                    else:
                        self.metrics.inter_token.observe((now - last) / len(delta.token_ids))
                    last = now
                if delta.usage is not None:
                    self.metrics.record_usage(delta.usage)
                await queue.put((index, delta))
        finally:
            await stream.aclose()


def _usage(prompt_tokens: int, finals: Sequence[TextDelta]) -> UsageInfo:
    completion = sum(d.usage.completion_tokens for d in finals if d.usage)
    cached = max((d.usage.cached_tokens for d in finals if d.usage), default=0)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class _Choice:
    """A choice's text and ids so far, and its final delta."""

    def __init__(self) -> None:
        self.text: List[str] = []
        self.token_ids: List[int] = []
        self.final: Optional[TextDelta] = None

    def add(self, delta: TextDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.final = delta

    @property
    def finish_reason(self) -> Optional[str]:
        reason = self.final.finish_reason if self.final else None
        return FINISH_REASONS.get(reason, reason)


async def _collect(deltas: AsyncIterator[Tuple[int, TextDelta]], count: int) -> List[_Choice]:
    choices = [_Choice() for _ in range(count)]
    async for index, delta in deltas:
        choices[index].add(delta)
    return choices


async def _until_disconnected(request: Request, work: Any) -> Optional[Any]:
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


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


# -- the app -------------------------------------------------------------------


def create_app(backend: Backend, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible FastAPI app over ``backend``; see the module doc."""
    metrics = ServerMetrics()
    backend.register_metrics(metrics.registry)
    admission = Admission(config.max_running, config.max_waiting, metrics)
    generation = Generation(backend, admission, metrics)
    builder = PromptBuilder(backend, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()

    app = FastAPI(title="modelscope_llama2 OpenAI-compatible server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.admission, app.state.backend = metrics, admission, backend
    _install_error_handlers(app, metrics)

    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{config.served_model_name}`.", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.served_model_name, max_model_len=backend.context_length)])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def respond(body: Any, request: Request, prompts: List[Prompt], kind: str, stream_chunks: Any,
                      build: Any) -> Any:
        """Generate ``prompts``; SSE chunks from ``stream_chunks`` or one response from ``build``."""
        response_id = f"{kind}-{uuid.uuid4().hex}"
        deltas = generation.run(prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _streaming(metrics, stream_chunks(response_id, deltas, include_usage))
        choices = await _until_disconnected(request, _collect(deltas, len(prompts)))
        if choices is None:
            return _client_gone(metrics)
        metrics.requests.labels(status="200").inc()
        return build(response_id, choices).model_dump(exclude_none=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompts = builder.chat(body)

        def build(response_id: str, choices: List[Any]) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=response_id, model=body.model,
                choices=[ChatChoice(index=i, message=AssistantMessage(content="".join(c.text).rstrip()),
                                    finish_reason=c.finish_reason,
                                    token_ids=c.token_ids if body.return_token_ids else None)
                         for i, c in enumerate(choices)],
                usage=_usage(len(prompts[0].token_ids), [c.final for c in choices if c.final]),
                prompt_token_ids=list(prompts[0].token_ids) if body.return_token_ids else None,
            )

        return await respond(body, request, prompts, "chatcmpl",
                             lambda rid, deltas, usage: _chat_chunks(body, prompts, rid, deltas, usage), build)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompts = builder.completion(body)

        def build(response_id: str, choices: List[Any]) -> CompletionResponse:
            return CompletionResponse(
                id=response_id, model=body.model,
                choices=[_completion_choice(body, builder, p, i, "".join(c.text), c.finish_reason, c.token_ids)
                         for i, (p, c) in enumerate(zip(prompts, choices))],
                usage=_usage(sum(len(p.token_ids) for p in prompts[::body.n]), [c.final for c in choices if c.final]),
            )

        return await respond(body, request, prompts, "cmpl",
                             lambda rid, deltas, usage: _completion_chunks(body, builder, prompts, rid, deltas, usage),
                             build)

    return GuardMiddleware(app, config.api_key, config.max_body_bytes)


def _client_gone(metrics: ServerMetrics) -> Response:
    # nginx's 499: nobody reads this response, but the metrics count the aborted request.
    metrics.requests.labels(status="499").inc()
    return Response(status_code=499)


def _completion_choice(body: CompletionRequest, builder: PromptBuilder, prompt: Prompt, index: int, text: str,
                       finish_reason: Optional[str], token_ids: List[int]) -> CompletionChoice:
    if body.echo and text is not None:
        text = _prompt_text(builder, prompt) + text
    return CompletionChoice(index=index, text=text, finish_reason=finish_reason,
                            token_ids=token_ids if body.return_token_ids else None,
                            prompt_token_ids=list(prompt.token_ids) if body.return_token_ids else None)


def _prompt_text(builder: PromptBuilder, prompt: Prompt) -> str:
    """What ``echo`` puts before the completion: the prompt as sent, or its ids decoded."""
    return prompt.message or builder.tokenizer.decode(prompt.token_ids, skip_special_tokens=True)


def _streaming(metrics: ServerMetrics, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as error:  # after the status line went out: an error event, as vLLM sends
            metrics.requests.labels(status=str(error.status)).inc()
            yield _sse(error.body.model_dump_json())
        except Exception:
            logger.exception("generation failed mid-stream")
            metrics.requests.labels(status="500").inc()
            yield _sse(ErrorResponse.of("The server failed while generating.", "server_error").model_dump_json())
        except asyncio.CancelledError:  # the client went away; closing the chunks aborts its generation
            metrics.requests.labels(status="499").inc()
            raise
        else:
            metrics.requests.labels(status="200").inc()
        finally:
            await chunks.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(body: ChatCompletionRequest, prompts: List[Prompt], response_id: str,
                       deltas: AsyncIterator[Tuple[int, TextDelta]], include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: List[ChatChunkChoice], **extra: Any) -> str:
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=choices, **extra))

    ids = list(prompts[0].token_ids) if body.return_token_ids else None
    yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                 for i in range(len(prompts))], prompt_token_ids=ids)
    finals: List[TextDelta] = []
    # The answer ends without its trailing whitespace, as chat() returns it: held until more text comes.
    held = [""] * len(prompts)
    async for index, delta in deltas:
        reason = FINISH_REASONS.get(delta.finish_reason, delta.finish_reason)
        text = held[index] + delta.text
        shown = text.rstrip()
        held[index] = "" if reason else text[len(shown):]
        if shown or reason:
            token_ids = list(delta.token_ids) if body.return_token_ids else None
            yield chunk([ChatChunkChoice(index=index, delta=Delta(content=shown), finish_reason=reason,
                                         token_ids=token_ids)])
        if delta.finish_reason is not None:
            finals.append(delta)
    if include_usage:
        yield chunk([], usage=_usage(len(prompts[0].token_ids), finals))


async def _completion_chunks(body: CompletionRequest, builder: PromptBuilder, prompts: List[Prompt],
                             response_id: str, deltas: AsyncIterator[Tuple[int, TextDelta]],
                             include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    echoed = set()
    finals: List[TextDelta] = []
    async for index, delta in deltas:
        reason = FINISH_REASONS.get(delta.finish_reason, delta.finish_reason)
        text = delta.text
        if body.echo and index not in echoed:
            echoed.add(index)
            text = _prompt_text(builder, prompts[index]) + text
        if text or reason:
            choice = CompletionChoice(index=index, text=text, finish_reason=reason,
                                      token_ids=list(delta.token_ids) if body.return_token_ids else None)
            yield _sse(CompletionResponse(id=response_id, created=created, model=body.model, choices=[choice]))
        if delta.finish_reason is not None:
            finals.append(delta)
    if include_usage:
        usage = _usage(sum(len(p.token_ids) for p in prompts[::body.n]), finals)
        yield _sse(CompletionResponse(id=response_id, created=created, model=body.model, choices=[], usage=usage))


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def counted(response: JSONResponse) -> JSONResponse:
        metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return counted(error.response())

    @app.exception_handler(BackendUnavailable)
    async def unavailable(_: Request, error: BackendUnavailable) -> JSONResponse:
        return counted(_error(503, f"The model is not available: {error}", "service_unavailable_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            message = f"{param or 'body'}: {first.get('msg')}"
        return counted(_error(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return counted(_error(error.status_code, str(error.detail), param=None, code=code))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=error)  # the trace stays in the server's log
        return counted(_error(500, "The server had an error while processing your request.", "server_error"))


