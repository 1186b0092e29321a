"""The HTTP routes (FastAPI), over one Controller on the same event loop.

    POST   /v1/images/generations                 generate (OpenAI's shape, engine/serve/api.py)
    DELETE /v1/images/generations/{request_id}    cancel a queued or running request
    GET    /health                                200 when warm and ready; 503 starting/warming/restarting/stopping
    GET    /metrics                               Prometheus text
    GET    /v1/models                             the served model (OpenAI's list shape)

A client that disconnects cancels its request. PNG encoding runs in a thread pool, never on the
event loop, so one answer being encoded does not hold up the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import api
from .controller import BadRequest, Controller, ServeError
from .metrics import CONTENT_TYPE


def build_app(controller: Controller) -> FastAPI:
    app = FastAPI(title="shardiff", docs_url=None, redoc_url=None, openapi_url=None)
    encoder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shardiff-png")

    def error(e: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return JSONResponse(api.error_body(str(e), e.kind, e.status), status_code=e.status, headers=headers)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON: {e}") from None
            try:
                requests, options = api.parse_body(body, model=controller.config.model,
                                                   max_images=controller.options.max_images)
            except ValueError as e:
                controller.metrics.requests.labels("rejected").inc()
                raise BadRequest(str(e)) from None
            job = controller.admit(requests, **options)
        except ServeError as e:
            return error(e)
        answer = asyncio.ensure_future(controller.result(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server gave up waiting on this answer (shutdown)
            controller.cancel(job.id)
            answer.cancel()
            raise
        finally:
            gone.cancel()
        if not answer.done():
            controller.cancel(job.id)  # the client went away: nobody is left to answer
            answer.cancel()
            return Response(status_code=499)
        try:
            result = answer.result()
        except ServeError as e:
            return error(e)
        body = await asyncio.get_running_loop().run_in_executor(encoder, api.encode_response, result)
        return JSONResponse(body, headers={"X-Request-Id": job.id})

    @app.delete("/v1/images/generations/{request_id}")
    async def cancel(request_id: str):
        status = controller.cancel(request_id)
        if status is None:
            return JSONResponse(api.error_body(f"no queued or running request {request_id!r}", "not_found", 404),
                                status_code=404)
        return {"id": request_id, "status": status}

    @app.get("/health")
    async def health():
        state = controller.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(controller.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": controller.config.model, "object": "model",
                                            "created": int(time.time()), "owned_by": "shardiff"}]}

    app.state.encoder = encoder
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
