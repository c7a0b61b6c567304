"""The ASGI guard in front of the app: the API key and the body cap, checked before any route runs.

Example:
    >>> guard = GuardMiddleware(app=None, api_key="sk-1", max_body_bytes=1024)
    >>> guard.expected
    b'Bearer sk-1'
"""

import hmac
from typing import Any, Dict, List, Optional

from .errors import error_response

# The one path answered without the key: load balancers and probes poll it.
OPEN_PATHS = frozenset({"/health"})


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
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            # hmac.compare_digest: the time taken does not tell how much of a guessed key matched.
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await error_response(401, "Incorrect API key provided. Send it as 'Authorization: Bearer "
                                                 "KEY'.", code="invalid_api_key")(scope, receive, send)
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
        await error_response(413, f"The request body is larger than {self.max_body_bytes} bytes.",
                             code="request_too_large")(scope, receive, send)
