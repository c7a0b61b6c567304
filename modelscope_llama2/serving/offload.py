"""Large request bodies parsed and validated off the event loop.

FastAPI parses and validates a route's body on the event loop: a 1 MiB
body of 30,000 chat messages holds every other request (``/health``
included) for a fraction of a second, more on a busy machine.
:class:`OffLoopBodyRoute` does it in a worker thread for bodies of
``OFF_LOOP_BYTES`` or more; smaller ones take FastAPI's own path, and
validation errors are the same ``RequestValidationError`` either way.

Example:
    >>> from fastapi import FastAPI
    >>> app = FastAPI()
    >>> app.router.route_class = OffLoopBodyRoute
"""

import asyncio
from typing import Any, Callable, Coroutine

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

# Below this a body validates in well under a millisecond: not worth a thread hop.
OFF_LOOP_BYTES = 64 << 10


class OffLoopBodyRoute(APIRoute):
    """A route whose one JSON body model is validated in a thread when the body is large."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        default = super().get_route_handler()
        dependant = self.dependant
        if len(dependant.body_params) != 1 or dependant.path_params or dependant.query_params \
                or dependant.dependencies:
            return default
        name, model = dependant.body_params[0].name, dependant.body_params[0].field_info.annotation
        request_name, endpoint = dependant.request_param_name, self.endpoint

        async def handler(request: Request) -> Response:
            raw = await request.body()  # cached on the request: FastAPI's path reads it again for free
            if len(raw) < OFF_LOOP_BYTES:
                return await default(request)
            try:
                body = await asyncio.to_thread(model.model_validate_json, raw)
            except ValidationError as error:
                raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
            arguments = {name: body, **({request_name: request} if request_name else {})}
            result = await endpoint(**arguments)
            return result if isinstance(result, Response) else JSONResponse(jsonable_encoder(result))

        return handler
