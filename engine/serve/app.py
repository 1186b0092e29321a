"""The HTTP routes (FastAPI), over one Controller on the same event loop.

    POST   /v1/images/generations                 generate (OpenAI's shape, engine/serve/api.py)
    POST   /v1/images/edits                       edit: multipart form (OpenAI's client) or JSON
    DELETE /v1/images/generations/{request_id}    cancel a queued or running request
    GET    /health                                200 when warm and ready; 503 starting/warming/restarting/stopping
    GET    /metrics                               Prometheus text
    GET    /v1/models, /v1/models/{id}            the served model (OpenAI's shapes)
    GET    /v1/loras                              the named LoRA adapters a request may choose

In front of them, engine/serve/guard.py (Host, API key, body type and size). Every error is OpenAI's
JSON shape, FastAPI's own (unknown route, wrong method) and unexpected ones included; no message
carries an address, a source path or a port (engine/serve/errors.py). A client that disconnects
cancels its request. Parsing a body (JSON, input images) runs in a thread pool, never on the event
loop; the images come encoded from the first rank (engine/serve/encode.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import api
from .controller import BadRequest, Cancelled, Controller, NotFound, ServeError
from .errors import check_request_id
from .forms import form_body
from .guard import Guard, loopback_hosts
from .metrics import CONTENT_TYPE
from .preview import Previews
from .stream import Stream


def build_app(controller: Controller, *, host: str = "127.0.0.1", proxy_ids: bool = False) -> FastAPI:
    """`proxy_ids`: a proxy in front (Ray Serve's) gives every request an X-Request-Id and adds it to the
    answer: a request without its own request_id takes that id as its own, and the answer does not set
    the header a second time."""
    app = FastAPI(title="shardiff", docs_url=None, redoc_url=None, openapi_url=None)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shardiff-parse")
    options = controller.options

    def error(e: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return JSONResponse(api.error_body(str(e), e.kind, e.status), status_code=e.status, headers=headers)

    async def parse(request: Request, edit: bool):
        """(requests, options) of an image request; BadRequest."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            if media == "multipart/form-data":
                body = await form_body(request)
            else:
                raw = await request.body()
                body = await asyncio.get_running_loop().run_in_executor(pool, _json, raw)
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(
                api.parse_body, body, model=controller.config.model, max_images=options.max_images,
                max_input_pixels=options.max_input_pixels, edit=edit, max_input_images=controller.max_input_images))
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def images(request: Request, edit: bool):
        try:
            requests, opts = await parse(request, edit)
        except ServeError as e:
            controller.metrics.requests.labels(e.outcome).inc()
            return error(e)
        output: api.Output = opts["output"]
        stream = Stream(controller, output, requests) if output.stream else None
        previews = Previews(output.partial_images, output.encoding) if stream and output.partial_images else None
        request_id = opts["request_id"]
        if proxy_ids and request_id is None:
            given = request.headers.get("x-request-id")
            request_id = given if given and _valid_id(given) and given not in controller.jobs else None
        id_header = () if proxy_ids else ("X-Request-Id",)  # behind a proxy: its header, set by it
        try:  # refusals are counted by the controller
            job = controller.admit(requests, request_id=request_id, timeout=opts["timeout"],
                                   encoding=output.encoding, previews=previews,
                                   on_partial=stream.on_partial if stream else None, lora=opts["lora"])
        except ServeError as e:
            return error(e)
        if stream is not None:
            stream.job = job
            return StreamingResponse(stream.events(), media_type="text/event-stream",
                                     headers={**{h: job.id for h in id_header}, "Cache-Control": "no-cache"})
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
            return error(Cancelled(f"request {job.id} was cancelled: the client closed the connection"))
        try:
            result = answer.result()
        except ServeError as e:
            return error(e)
        usage = api.usage(result.results, requests, controller.info.spatial_multiple)
        return JSONResponse(api.encode_response(result, output, usage),
                            headers={h: job.id for h in id_header})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await images(request, edit=False)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await images(request, edit=True)

    @app.delete("/v1/images/generations/{request_id}")
    async def cancel(request_id: str):
        status = controller.cancel(request_id)
        if status is None:
            return error(NotFound(f"no queued or running request {request_id[:128]!r}"))
        return {"id": request_id, "status": status}

    @app.get("/health")
    async def health():
        state = controller.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(controller.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": controller.config.model, "object": "model", "created": int(controller.started),
                "owned_by": "shardiff"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/loras")
    async def loras():
        return {"object": "list", "data": [
            {"id": name, "object": "lora", "scale": spec.scale,
             "groups": [g.index for g in controller.groups if name in dict(g.fused)]}
            for name, spec in controller.adapters.items()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != controller.config.model:
            return error(NotFound(f"this server serves the model {controller.config.model!r} only"))
        return model_card()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = {404: "no such route", 405: f"{request.method} is not allowed here"}.get(e.status_code, str(e.detail))
        return JSONResponse(api.error_body(message, kind, e.status_code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(api.error_body("the request is malformed", "invalid_request_error", 400), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        controller.log(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}")
        return JSONResponse(api.error_body("internal server error", "server_error", 500), status_code=500)

    app.state.pool = pool
    app.add_middleware(Guard, max_body=options.max_body_bytes, api_key=options.api_key, hosts=loopback_hosts(host),
                       count=lambda outcome: controller.metrics.requests.labels(outcome).inc())
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"],
                           expose_headers=["x-request-id", "retry-after"])
    return app


def _valid_id(text: str) -> bool:
    try:
        check_request_id(text)
    except BadRequest:
        return False
    return True


def _json(raw: bytes):
    """The JSON value of a body; ValueError (deep nesting, a huge integer, bad UTF-8 included)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError("the body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise ValueError("the body is not valid JSON: it is nested too deeply") from None
    except ValueError:  # Python's own bound on an integer's digits
        raise ValueError("the body is not valid JSON: a number has too many digits") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
