"""The OpenAI-compatible HTTP app: chat, completions, responses, models, and vLLM's tokenize routes.

:func:`create_app` builds a FastAPI app over a
:class:`~modelscope_llama2.serving.backend.Backend`. The app turns each
request into Meta-exact :class:`~modelscope_llama2.prompts.prompt.Prompt`
objects (one per choice), admits them into a bounded number of running
slots with a bounded waiting line (429 past it), streams the backend's
text deltas back as OpenAI JSON or SSE chunks, and aborts a request whose
client goes away. Each route family has its handler in
:mod:`modelscope_llama2.serving.handlers`.

Safe by default: with an API key every route but ``/health`` needs
``Authorization: Bearer KEY`` (compared in constant time), bodies are capped
(413), and errors are OpenAI's error body, never a stack trace.

Example (the demo checkpoint's engine; ``uvicorn.run(app, host="127.0.0.1", port=8000)``
serves the app, FastAPI's ``TestClient`` calls it in this process):

    >>> from fastapi.testclient import TestClient
    >>> from modelscope_llama2.serving.backend import LocalBackend
    >>> backend = LocalBackend(model.engine, tokenizer)
    >>> app = create_app(backend, ServerConfig("llama-2-7b-chat", api_key="sk-1"))
    >>> with TestClient(app) as client:
    ...     reply = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-1"}, json={
    ...         "model": "llama-2-7b-chat", "temperature": 0,
    ...         "messages": [{"role": "user", "content": "Where is the capital of Zhejiang?"}]})
    >>> reply.json()["choices"][0]["message"]["content"]
    'The capital of Zhejiang Province is Hangzhou.'
"""

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .admission import Admission
from .backend import Backend, BackendUnavailable
from .bodies import OffLoopRoute
from .config import ServerConfig
from .errors import install_error_handlers
from .generation import Generation
from .handlers.base import RequestBuilder
from .handlers.chat import ChatHandler
from .handlers.completion import CompletionHandler
from .handlers.responses import ResponsesHandler, ResponseStore
from .handlers.tokenization import TokenizationHandler
from .metrics import ServerMetrics
from .middleware import GuardMiddleware
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
                       ModelList, ResponsesRequest, TokenizeRequest, TokenizeResponse, TokenizerInfo)

__all__ = ["ServerConfig", "create_app"]


class Drain:
    """Graceful shutdown: new generations are refused (503) at once; after ``timeout`` seconds the rest are ended.

    A streamed answer then gets an error event and ``[DONE]``, a whole one
    a 503 body: every client hears how its request ended before the server exits.
    """

    def __init__(self, generation: Generation):
        self.generation = generation
        self.draining = False

    def begin(self, timeout: float) -> None:
        """Start draining (on the event loop; the server calls it on SIGTERM or Ctrl-C)."""
        if self.draining:
            return
        self.draining = True
        self.generation.refuse(BackendUnavailable("the server is shutting down"))
        asyncio.get_running_loop().call_later(timeout, self.generation.fail_all,
                                              BackendUnavailable("the server is shutting down; send it again"))

    async def ended(self, poll_s: float = 0.05) -> None:
        """Return once no request is generating (after :meth:`begin`: within its timeout)."""
        while self.generation.in_flight:
            await asyncio.sleep(poll_s)


def create_app(backend: Backend, config: ServerConfig) -> Any:
    """The OpenAI-compatible app over ``backend``, behind its guard; see the module doc."""
    metrics = ServerMetrics()
    backend.register_metrics(metrics.registry)
    admission = Admission(config.max_running, config.max_waiting, metrics)
    generation = Generation(backend, admission, metrics)
    builder = RequestBuilder(backend, config)
    chat = ChatHandler(builder, generation, metrics)
    completion = CompletionHandler(builder, generation, metrics)
    responses = ResponsesHandler(builder, generation, metrics, store=ResponseStore(config.responses_store_size))
    tokenization = TokenizationHandler(builder)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()

    app = FastAPI(title="modelscope_llama2 OpenAI-compatible server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.router.route_class = OffLoopRoute  # large bodies parsed and validated off the event loop
    app.state.metrics, app.state.admission, app.state.backend = metrics, admission, backend
    app.state.drain = drain = Drain(generation)
    install_error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> Any:
        if drain.draining:  # load balancers stop sending here
            return JSONResponse({"status": "draining"}, status_code=503)
        if not backend.alive:  # a supervisor restarts the server
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    card = ModelCard(id=config.served_model_name, max_model_len=backend.context_length)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        builder.check_model(model_id)
        return card

    # Prometheus' text format, documented as such in /openapi.json.
    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat.create(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await completion.create(body, request)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        return await responses.create(body, request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Dict[str, Any]:
        return responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Dict[str, Any]:
        return responses.delete(response_id)

    # Off the event loop, as prompt building is: a long dialog or id list takes a while to encode or decode.
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await asyncio.to_thread(tokenization.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await asyncio.to_thread(tokenization.detokenize, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfo:
        return tokenization.info()

    return GuardMiddleware(app, config.api_key, config.max_body_bytes, metrics, config.body_timeout)
