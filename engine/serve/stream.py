"""Streamed answers (`"stream": true`): server-sent events as OpenAI's image streaming defines them.

    event: image_generation.partial_image        (edits: image_edit.partial_image)
    data: {"type": …, "b64_json": …, "partial_image_index": 0, "background", "created_at",
           "output_format", "quality", "size"}
    …                                            (partial_images of them: 0–3)
    event: image_generation.completed            (edits: image_edit.completed; one per image)
    data: {"type": …, "b64_json": …, "background", "created_at", "output_format", "quality", "size",
           "usage", "seed"}

The partial images come from the ranks at evenly spaced steps (engine/serve/preview.py) as the request
runs. An error after the stream began (a deadline, a failed group, a shutdown) is one last event,
`event: error` with OpenAI's error body, which OpenAI's client raises as an APIError. A client that
closes the stream cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time

from . import api
from .errors import ServeError


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Stream:
    """The events of one streamed job: partial images queued as they arrive, then the result."""

    def __init__(self, controller, output: api.Output, requests: list):
        self.controller, self.output, self.requests = controller, output, requests
        self.kind = "image_edit" if output.edit else "image_generation"
        self.partials: asyncio.Queue = asyncio.Queue()
        self.job = None

    def on_partial(self, index: int, b64: str) -> None:
        self.partials.put_nowait((index, b64))

    def _common(self, size: str) -> dict:
        return {"background": "opaque", "created_at": int(time.time()), "output_format": self.output.encoding.format,
                "quality": self.output.quality or "auto", "size": size}

    async def events(self):
        job = self.job
        first = job.requests[0]
        size = f"{first.width}x{first.height}" if first.width else "auto"
        answer = asyncio.ensure_future(self.controller.result(job))
        try:
            while True:
                waiting = asyncio.ensure_future(self.partials.get())
                await asyncio.wait({waiting, answer}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    break
                index, b64 = waiting.result()
                yield sse(f"{self.kind}.partial_image", {"type": f"{self.kind}.partial_image", "b64_json": b64,
                                                          "partial_image_index": index, **self._common(size)})
            while not self.partials.empty():  # sent before the result, on the same channel
                index, b64 = self.partials.get_nowait()
                yield sse(f"{self.kind}.partial_image", {"type": f"{self.kind}.partial_image", "b64_json": b64,
                                                          "partial_image_index": index, **self._common(size)})
            try:
                result = answer.result()
            except ServeError as e:
                yield sse("error", api.error_body(str(e), e.kind, e.status))
                return
            usage = api.usage(result.results, self.requests, self.controller.info.spatial_multiple)
            for r in result.results:
                params = r.params
                yield sse(f"{self.kind}.completed", {
                    "type": f"{self.kind}.completed", "b64_json": r.b64,
                    **self._common(f"{params['width']}x{params['height']}"), "usage": usage,
                    "seed": params["seed"], "id": result.id})
        finally:
            if not answer.done():  # the client closed the stream: nobody is left to answer
                self.controller.cancel(job.id)
                answer.cancel()
