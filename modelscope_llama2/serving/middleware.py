"""The ASGI guard in front of the app: API key, body cap and deadline, and text that cannot be encoded.

Everything here is answered before any route runs, with OpenAI's error body,
and counted in the app's metrics like every other answer:

* 401 without the key (every path but ``/health``), 400 for two
  ``Authorization`` headers (which one would count is up to each proxy);
* 413 past ``max_body_bytes``; 408 when the body has not arrived within
  ``body_timeout`` seconds (a client that stalls mid-body holds a
  connection and a buffer otherwise: uvicorn has no such deadline);
* 400 naming the field for a JSON string holding a lone UTF-16 surrogate
  (``"\\ud800"``), which no tokenizer, log line or error message can encode.

Example:
    >>> guard = GuardMiddleware(app=None, api_key="sk-1", max_body_bytes=1024)
    >>> guard.expected
    b'Bearer sk-1'
    >>> unencodable_field({"messages": [{"role": "user", "content": "x\\ud800"}]})
    'messages[0].content'
"""

import asyncio
import hmac
import json
import re
from typing import Any, Dict, List, Optional

from .errors import error_response
from .metrics import ServerMetrics

# The one path answered without the key: load balancers and probes poll it.
OPEN_PATHS = frozenset({"/health"})
# A JSON escape of a UTF-16 surrogate: only a body holding one is parsed here.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class GuardMiddleware:
    """Checks the API key, caps and times the request body, refuses unencodable text: before the app sees it."""

    def __init__(self, app: Any, api_key: Optional[str], max_body_bytes: int,
                 metrics: Optional[ServerMetrics] = None, body_timeout: float = 30.0):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check_headers(scope)
        if refusal is not None:
            return await self._answer(refusal, scope, receive, send)
        try:
            body, rest = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return await self._answer((408, f"The request body did not arrive within {self.body_timeout:g} "
                                            "seconds.", None, "request_timeout"), scope, receive, send)
        except _TooLarge:
            return await self._answer(self._too_large(), scope, receive, send)
        if SURROGATE_ESCAPE.search(body):
            # In a worker thread: walking a large body's every string would hold up the event loop.
            field = await asyncio.to_thread(lambda: unencodable_field(_json_or_none(body)))
            if field is not None:
                return await self._answer((400, f"{field}: contains a lone UTF-16 surrogate, which is not text; "
                                                "send valid Unicode", field, None), scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}, *rest]

        async def replayed() -> Dict[str, Any]:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    def _check_headers(self, scope: Dict[str, Any]) -> Optional[tuple]:
        keys = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(keys) > 1:
            return 400, "Send one Authorization header, not several.", "authorization", None
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            # hmac.compare_digest: the time taken does not tell how much of a guessed key matched.
            if not hmac.compare_digest(keys[0] if keys else b"", self.expected):
                return 401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", None, \
                    "invalid_api_key"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive: Any) -> tuple:
        """The whole (capped) body, and any message that came instead of more of it (a disconnect)."""
        chunks: List[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge()
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), []

    def _too_large(self) -> tuple:
        return 413, f"The request body is larger than {self.max_body_bytes} bytes.", None, "request_too_large"

    async def _answer(self, refusal: tuple, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        status, message, param, code = refusal
        if self.metrics is not None:
            self.metrics.requests.labels(status=str(status)).inc()
        await error_response(status, message, param=param, code=code)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None  # the app answers invalid JSON itself


def unencodable_field(value: Any, path: str = "") -> Optional[str]:
    """The path (``messages[0].content``) of the first string in ``value`` that cannot be encoded, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = unencodable_field(key, where) if isinstance(key, str) else None
        found = found or unencodable_field(item, where)
        if found:
            return found
    return None
