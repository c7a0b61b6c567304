"""Building and running the server: a checkpoint dir to an engine, a backend, an app, uvicorn.

Example:
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> sorted(default_sampling(DEMO_DIR))
    ['do_sample']
"""

import asyncio
import gc
import importlib.util
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..constants import API_KEY_ENV
from ..engines.factory import load_engine
from ..engines.process import ProcessEngine
from .backend import LocalBackend
from .app import create_app
from .config import ServerConfig

logger = logging.getLogger(__name__)



def default_sampling(model_dir: str) -> Dict[str, Any]:
    """The checkpoint's sampling defaults (``do_sample``, ``temperature``, ``top_p``), from its generation config."""
    from transformers import GenerationConfig

    if not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        return {}
    config = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    return {key: config[key] for key in ("do_sample", "temperature", "top_p") if key in config}


def build_app(model_dir: str, served_model_name: str, engine: str = "transformers", dtype: str = "auto",
              device: Optional[str] = None, api_key: Optional[str] = None, engine_process: bool = True,
              **limits: Any) -> Any:
    """The OpenAI app over a local engine for ``model_dir`` (``limits``: :class:`ServerConfig` fields).

    ``engine_process``: the transformers engine runs in a child process
    (:class:`~modelscope_llama2.engines.process.ProcessEngine`), so the event
    loop and the step loop do not share one GIL; False keeps it in this one.
    vLLM runs its engine core in its own process already.
    """
    from ..tokenizer import Llama2Tokenizer

    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    max_running = limits.get("max_running", ServerConfig.max_running)
    # The batching engine runs as many requests at once as the server admits.
    engine_kwargs = {"max_batch_size": max_running} if engine == "transformers" else {}
    if engine == "transformers" and engine_process:
        loaded = ProcessEngine(load_engine, model_dir, engine, dtype, device, **engine_kwargs)
    else:
        loaded = load_engine(model_dir, engine, dtype, device, **engine_kwargs)
    backend = LocalBackend(loaded, tokenizer, max_workers=max_running)
    config = ServerConfig(served_model_name, api_key=api_key, default_sampling=default_sampling(model_dir), **limits)
    return create_app(backend, config)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may take: the server's answer to idle, slow and too many clients.

    ``header_timeout``: seconds for a request's headers, from the
    connection's start or the previous answer's end (slowloris);
    ``keep_alive``: seconds an idle keep-alive connection stays open;
    ``max_connections``: connections and requests at once (503 past it);
    ``drain_timeout``: on SIGTERM or Ctrl-C, seconds in-flight requests may
    finish before the rest end with an error (a stream: an error event and ``[DONE]``).
    """

    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_connections: int = 512
    drain_timeout: float = 10.0


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
        limits: ConnectionLimits = ConnectionLimits()) -> None:
    """Serve ``app`` with uvicorn until SIGTERM or Ctrl-C, then drain; warns when a public address has no API key."""
    import uvicorn

    if not api_key and not is_loopback(host):
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(pass --api-key or set %s)", host, API_KEY_ENV)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", http=header_deadline_http(limits.header_timeout),
                            timeout_keep_alive=limits.keep_alive, limit_concurrency=limits.max_connections,
                            # A backstop only: the drain ends every request itself by then.
                            timeout_graceful_shutdown=int(limits.drain_timeout) + 5)
    # The model, torch and the libraries are loaded for good: frozen, the collector never walks their
    # ~500k objects again. Unfrozen, one full collection held the GIL, so the event loop, for 0.5-1 s.
    gc.freeze()
    draining_server(config, limits.drain_timeout).run()


def drain_of(app: Any) -> Any:
    """The :class:`~modelscope_llama2.serving.app.Drain` of an app built by ``create_app`` (inside its guard)."""
    return app.app.state.drain


def draining_server(config: Any, drain_timeout: float) -> Any:
    """A uvicorn server whose first SIGTERM/SIGINT starts the app's drain as uvicorn stops accepting connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(self, "_loop", None)
            if loop is not None and not self.should_exit:
                loop.call_soon_threadsafe(drain_of(self.config.app).begin, drain_timeout)
            super().handle_exit(sig, frame)

    return Server(config)


def header_deadline_http(header_timeout: float, parser: Optional[str] = None) -> Any:
    """uvicorn's HTTP protocol with a deadline for each request's headers (uvicorn has none: slowloris).

    ``parser``: ``httptools`` or ``h11``; by default httptools where it is
    installed (the ``[serve]`` extra has it): its C parser and direct chunk
    framing cost the event loop about half of what h11's pure-Python ones
    do per streamed chunk.
    """
    if parser is None:
        parser = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    if parser == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class HeaderDeadlineH11(_HeaderDeadline, H11Protocol):
            def handle_events(self) -> None:
                super().handle_events()
                if self.cycle is not None and not self.cycle.response_complete:
                    self._disarm()  # the headers are in: the request runs

        return _with_timeout(HeaderDeadlineH11, header_timeout)
    if parser != "httptools":
        raise ValueError(f"parser: expected 'httptools' or 'h11', got {parser!r}")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadlineHttpTools(_HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._disarm()  # the headers are in: the request runs

    return _with_timeout(HeaderDeadlineHttpTools, header_timeout)


def _with_timeout(protocol: Any, header_timeout: float) -> Any:
    return type(protocol.__name__, (protocol,), {"header_timeout": header_timeout})


class _HeaderDeadline:
    """The deadline, armed when a connection opens and after each response, disarmed when headers are in."""

    header_timeout: float
    _deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None or cycle.response_complete:
            self.transport.close()  # type: ignore[attr-defined]
