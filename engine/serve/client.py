"""Python clients of a served model: the same methods in-process (`serve.start`) and over HTTP
(`serve.connect`), each thread-safe, each with an async form.

    generate(request)          → GenerateResult (request: GenerateRequest, a dict of the HTTP body's
                                 fields — a missing seed is drawn —, or a prompt); lora={name: scale}
                                 runs the server's named adapters
    generate_batch(requests)   → [GenerateResult]: one job, spread by the engine's own dp / cfg rules
    agenerate / agenerate_batch: the same, awaitable; cancelling the awaiting task cancels the request
    cancel(request_id), health()

Errors are the controller's ServeError subclasses (BadRequest is also a ValueError), with the
server's one-line message. The in-process client returns the rank's PIL images as they are; the HTTP
client decodes the PNG (the same pixels) and reads the parameters back from its metadata.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

from engine.config import GenerateRequest
from engine.driver import GenerateResult

from . import api
from .controller import (
    BadRequest, Cancelled, Conflict, DeadlineExceeded, Forbidden, NotFound, PayloadTooLarge, ServeError,
    TooManyRequests, Unauthorized, Unavailable, UnsupportedMediaType, WorkerFailure,
)


def _requests(request, controller_model: str, max_images: int, n: int, max_input_images: int | None = None):
    """(requests, options) of one generate call."""
    if isinstance(request, GenerateRequest):
        if n != 1:
            raise BadRequest("n > 1 is for dict requests (seeds seed, seed + 1, …); give generate_batch a list")
        return [request], {}
    if isinstance(request, str):
        request = {"prompt": request}
    if isinstance(request, dict):
        body = encode_images(request)
        if n != 1:
            body["n"] = n
        try:
            return api.parse_body(body, model=controller_model, max_images=max_images,
                                  max_input_images=max_input_images)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    raise TypeError(f"a request is a GenerateRequest, a dict or a prompt, not {type(request).__name__}")


def _with_id(results: list, job_id: str) -> list:
    for r in results:
        r.params["request_id"] = job_id
    return results


class Client:
    """In the server's own process (serve.start): requests go straight to the controller's queue, no
    HTTP, no PNG. Closing it (or leaving its `with` block) shuts the server down."""

    def __init__(self, background):
        self._bg = background
        self.controller = background.controller

    @property
    def url(self) -> str | None:
        """The HTTP address when started with a port, else None."""
        return self._bg.url

    def generate(self, request, *, n: int = 1, request_id: str | None = None, timeout: float | None = None,
                 lora: dict | None = None):
        """One request (n > 1 with a dict: n images, seeds seed … seed + n - 1): a GenerateResult, or a
        list of n of them. `lora`: the server's named adapters to run with, {name: scale}."""
        results = self._bg.call(self._one(request, n, request_id, timeout, lora))
        return results[0] if n == 1 else results

    def generate_batch(self, requests: list, *, request_id: str | None = None, timeout: float | None = None,
                       lora: dict | None = None) -> list:
        """Several GenerateRequests as one job (the engine's generate_batch: dp / cfg rules)."""
        return self._bg.call(self._run(list(requests), request_id, timeout, lora))

    def job(self, requests: list, *, request_id: str | None = None, timeout: float | None = None, encoding=None,
            lora: dict | None = None):
        """Like generate_batch, but the controller's JobResult: the results and the server's clocks
        (queue_s, lora_s, generate_s on the first rank, encode_s, total_s from admission to answer) and the
        group that ran it. `encoding` (engine.serve.encode.Encoding): the images come as the HTTP answers'
        files (Encoded)."""
        return self._bg.call(self.controller.generate(list(requests), request_id=request_id, timeout=timeout,
                                                      encoding=encoding, lora=lora))

    async def agenerate(self, request, *, n: int = 1, request_id: str | None = None, timeout: float | None = None,
                        lora: dict | None = None):
        results = await asyncio.wrap_future(self._bg.submit(self._one(request, n, request_id, timeout, lora)))
        return results[0] if n == 1 else results

    async def agenerate_batch(self, requests: list, *, request_id: str | None = None,
                              timeout: float | None = None, lora: dict | None = None) -> list:
        return await asyncio.wrap_future(self._bg.submit(self._run(list(requests), request_id, timeout, lora)))

    async def _one(self, request, n, request_id, timeout, lora):
        c = self.controller
        requests, options = _requests(request, c.config.model, c.options.max_images, n, c.max_input_images)
        return await self._run(requests, request_id or options.get("request_id"),
                               timeout if timeout is not None else options.get("timeout"),
                               lora if lora is not None else options.get("lora"))

    async def _run(self, requests, request_id, timeout, lora=None):
        result = await self.controller.generate(requests, request_id=request_id, timeout=timeout, lora=lora)
        return _with_id(result.results, result.id)

    def cancel(self, request_id: str) -> str | None:
        return self._bg.call(_call(self.controller.cancel, request_id))

    def health(self) -> dict:
        return self._bg.call(_call(self.controller.health))

    def wait_ready(self, timeout: float | None = None) -> None:
        self._bg.call(self.controller.wait_ready(timeout))

    def close(self) -> int | None:
        """Shut the server down (see engine/serve/runner.py); its exit status (0, or 1 if it had failed)."""
        return self._bg.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _call(fn, *args):
    return fn(*args)


ERRORS = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
          415: UnsupportedMediaType, 429: TooManyRequests, 499: Cancelled, 500: WorkerFailure, 503: Unavailable,
          504: DeadlineExceeded}


class HTTPClient:
    """A server over HTTP (`serve.connect(url)`); httpx underneath (its clients are thread-safe)."""

    def __init__(self, url: str, *, timeout: float = 900.0, api_key: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sync = httpx.Client(base_url=self.url, timeout=timeout, headers=self._headers)
        self._async_timeout = timeout

    def generate(self, request, *, n: int = 1, request_id: str | None = None, timeout: float | None = None,
                 lora: dict | None = None):
        r = self._sync.post("/v1/images/generations", json=self._body(request, n, request_id, timeout, lora))
        results = self._decode(r)
        return results[0] if n == 1 else results

    async def agenerate(self, request, *, n: int = 1, request_id: str | None = None, timeout: float | None = None,
                        lora: dict | None = None):
        import httpx

        async with httpx.AsyncClient(base_url=self.url, timeout=self._async_timeout, headers=self._headers) as client:
            r = await client.post("/v1/images/generations", json=self._body(request, n, request_id, timeout, lora))
        results = self._decode(r)
        return results[0] if n == 1 else results

    def cancel(self, request_id: str) -> str | None:
        r = self._sync.delete(f"/v1/images/generations/{request_id}")
        return None if r.status_code == 404 else r.json()["status"]

    def health(self) -> dict:
        return self._sync.get("/health").json()

    def close(self) -> None:
        self._sync.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _body(request, n: int, request_id, timeout, lora=None) -> dict:
        if isinstance(request, str):
            body = {"prompt": request}
        elif isinstance(request, dict):
            body = encode_images(request)
        elif isinstance(request, GenerateRequest):
            body = request_body(request)
        else:
            raise TypeError(f"a request is a GenerateRequest, a dict or a prompt, not {type(request).__name__}")
        if n != 1:
            body["n"] = n
        if request_id is not None:
            body["request_id"] = request_id
        if timeout is not None:
            body["timeout"] = timeout
        if lora is not None:
            body["lora"] = lora
        return body

    @staticmethod
    def _decode(r) -> list:
        from PIL import Image

        from engine.image_io import read_png_params

        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 — not our error shape (a proxy's page): say what came back
                message = f"HTTP {r.status_code}: {r.text[:200]}"
            error = ERRORS.get(r.status_code, ServeError)(message, retry_after=_retry_after(r))
            raise error
        answer = r.json()
        results = []
        for item in answer["data"]:
            png = base64.b64decode(item["b64_json"])
            image = Image.open(io.BytesIO(png))
            image.load()
            params = read_png_params(io.BytesIO(png))
            results.append(GenerateResult(image, None, params, params.get("seconds", 0.0), images=[image]))
        return _with_id(results, answer["id"])


def request_body(request: GenerateRequest) -> dict:
    """The HTTP body of `request` (one prompt, one image per request)."""
    if not isinstance(request.prompt, str) or request.num_images_per_prompt != 1:
        raise BadRequest("over HTTP a request has one prompt and one image; use n for several seeds")
    if (request.height is None) != (request.width is None):
        raise BadRequest("over HTTP give both height and width (size \"WxH\"), or neither")
    body = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
        "num_inference_steps": request.steps, "guidance_scale": request.guidance,
        "true_cfg_scale": request.true_cfg_scale, "max_sequence_length": request.max_sequence_length,
    }
    if request.height is not None:
        body["size"] = f"{request.width}x{request.height}"
    body.update(strength=request.strength, pag_scale=request.pag_scale, keep_image_size=request.keep_image_size or None,
                controlnet_scale=request.controlnet_scale, control_mode=request.control_mode)
    body.update({name: getattr(request, name) for name in api.IMAGES})
    return encode_images({k: v for k, v in body.items() if v is not None})


def encode_images(body: dict) -> dict:
    """The body with its input images (PIL images, or paths on the client's machine) as base64 PNG /
    the file's own bytes: the server reads no path."""
    out = dict(body)
    for name in api.IMAGES:
        value = out.get(name)
        if isinstance(value, (list, tuple)):  # several reference images
            out[name] = [_encoded(v) for v in value]
        elif value is not None:
            out[name] = _encoded(value)
    return out


def _encoded(value):
    """One input image as base64 (a PIL image: PNG; a file: its own bytes); anything else as it is."""
    from PIL import Image

    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    if isinstance(value, (str, Path)) and _is_file(value):
        return base64.b64encode(Path(value).expanduser().read_bytes()).decode("ascii")
    return value


def _is_file(value) -> bool:
    """A path of an existing file (a base64 string is none: too long for a name, or no such file)."""
    try:
        return Path(value).expanduser().is_file()
    except OSError:
        return False


def _retry_after(r) -> int | None:
    value = r.headers.get("Retry-After")
    return int(value) if value and value.isdigit() else None
