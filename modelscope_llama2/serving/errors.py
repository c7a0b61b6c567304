"""Errors as OpenAI answers them: one body (``{"error": {message, type, param, code}}``) for every failure.

The one rule: whatever goes wrong (a request the server refuses, a body
that does not validate, an unknown path, the model gone, a bug) is
answered with OpenAI's error body and a status, counted in the metrics,
never with a stack trace; the trace stays in the server's log.

Example:
    >>> error = APIError(400, "n: too many", param="n")
    >>> error.status, error.body.error.param
    (400, 'n')
"""

import logging
from typing import Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import BackendUnavailable, EngineFailed
from .metrics import ServerMetrics
from .protocol import ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with OpenAI's error body and ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse.of(message, type, param, code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    """OpenAI's error body as a response."""
    return APIError(status, message, type, param, code).response()


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every exception the app's routes raise becomes OpenAI's error body, counted by status."""
    def counted(response: JSONResponse) -> JSONResponse:
        metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return counted(error.response())

    @app.exception_handler(BackendUnavailable)
    async def unavailable(_: Request, error: BackendUnavailable) -> JSONResponse:
        return counted(error_response(503, f"The model is not available: {error}", "service_unavailable_error"))

    @app.exception_handler(EngineFailed)
    async def engine_failed(_: Request, error: EngineFailed) -> JSONResponse:
        logger.error("%s", error)
        return counted(error_response(500, "The engine failed while generating this answer.", "server_error"))

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
        return counted(error_response(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return counted(error_response(error.status_code, str(error.detail), param=None, code=code))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=error)  # the trace stays in the server's log
        return counted(error_response(500, "The server had an error while processing your request.",
                                      "server_error"))
