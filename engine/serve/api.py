"""The HTTP request and response of `POST /v1/images/generations`: OpenAI's fields, plus ours.

OpenAI's: `prompt`, `n`, `size` ("WxH" or "auto"), `response_format` ("b64_json"), `model` (if
given, the served model's name), `user` (ignored). Ours: `negative_prompt`, `seed`,
`num_inference_steps`, `guidance_scale`, `true_cfg_scale`, `max_sequence_length`, `timeout` (seconds,
at most the server's --request-timeout) and `request_id` (the id to cancel it by; unique among the
requests queued or running). The editing pipelines' (docs/PIPELINES.md): `image`, `mask_image`,
`control_image` (base64 or a data: URL of a PNG, JPEG or WebP file; never a path on the server),
`strength`, `pag_scale`, `keep_image_size`, `controlnet_scale`, `control_mode`; the pipeline form follows from them as on the CLI. Any
other field is refused, by name.

`n` images are `n` requests with the seeds seed, seed + 1, …, as the CLI's --num-images: image i
over HTTP is image i of `engine.generate --num-images n --seed seed`. A request without a seed gets
one drawn by the controller, returned in the answer.
"""

from __future__ import annotations

import base64
import math
import secrets
import time

from engine.config import GenerateRequest
from engine.image_io import png_bytes

FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "guidance", "true_cfg_scale": "true_cfg_scale", "max_sequence_length": "max_sequence_length",
}
"""Body field → GenerateRequest field."""
SCALARS = {"strength": "strength", "pag_scale": "pag_scale", "keep_image_size": "keep_image_size",
           "controlnet_scale": "controlnet_scale", "control_mode": "control_mode"}
"""Body field → GenerateRequest field, for the editing pipelines (docs/PIPELINES.md)."""
IMAGES = ("image", "mask_image", "control_image")
"""Body fields carrying an input image: base64 (or a data: URL) of a PNG, JPEG or WebP file. Never a
path: a client names no file on the server's disk."""
OTHER_FIELDS = ("n", "size", "response_format", "model", "user", "seed", "timeout", "request_id")
MAX_IMAGE_BYTES = 64 * 2**20
SEED_DRAWN_BELOW = 2**32
"""Drawn seeds fit 32 bits: every client's integers (JavaScript's included) hold them exactly."""


def draw_seed() -> int:
    return secrets.randbelow(SEED_DRAWN_BELOW)


def parse_size(size) -> tuple[int | None, int | None]:
    """"WxH" → (height, width); None or "auto" → the model's default size."""
    if size is None or size == "auto":
        return None, None
    if not isinstance(size, str):
        raise ValueError(f"size must be a string \"WIDTHxHEIGHT\" such as \"1024x1024\", got {size!r}")
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be \"WIDTHxHEIGHT\" such as \"1024x1024\" (or \"auto\"), got {size!r}")
    width, height = (int(p) for p in parts)
    return height, width


def decode_image(value, name: str):
    """The PIL image in a body's base64 field; ValueError naming the field."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise ValueError(f"{name} must be a base64 string (or a data: URL) of a PNG, JPEG or WebP image, "
                         f"got {type(value).__name__}")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"{name}: a data: URL must be base64 (data:image/png;base64,...)")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    try:
        # Image.open's own pixel limit refuses decompression bombs (an error past 2 × MAX_IMAGE_PIXELS).
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise ValueError(f"{name} is a {im.format} image; send PNG, JPEG or WebP")
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name} cannot be read as an image ({e})") from None


def parse_body(body, *, model: str, max_images: int) -> tuple[list[GenerateRequest], dict]:
    """(one GenerateRequest per image, options: request_id, timeout) from the JSON body; ValueError."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object such as {\"prompt\": \"a red fox\"}")
    known = [*FIELDS, *SCALARS, *IMAGES, *OTHER_FIELDS]
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; this server takes "
                         f"{', '.join(sorted(known))}")
    if "prompt" not in body:
        raise ValueError("prompt is missing")
    if not isinstance(body["prompt"], str):
        raise ValueError(f"prompt must be a string, got {type(body['prompt']).__name__}")
    if body.get("response_format", "b64_json") != "b64_json":
        raise ValueError(f"response_format {body['response_format']!r} is not supported; use \"b64_json\" "
                         "(images are returned in the answer, never stored)")
    if body.get("model") not in (None, model):
        raise ValueError(f"this server serves the model {model!r}, not {body['model']!r}")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
        raise ValueError(f"n must be an integer from 1 to {max_images}, got {n!r}")
    height, width = parse_size(body.get("size"))
    seed = body.get("seed")
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, int) and not isinstance(seed, bool) and seed <= 2**64 - 1 < seed + n - 1:
        raise ValueError(f"seed {seed} with n {n} runs past 2**64 - 1 (image i uses seed + i)")
    fields = {ours: body[theirs] for theirs, ours in {**FIELDS, **SCALARS}.items() if body.get(theirs) is not None}
    fields.update({name: decode_image(body[name], name) for name in IMAGES if body.get(name) is not None})
    # GenerateRequest checks every value (engine/validation.check_fields: the CLI's messages).
    requests = [GenerateRequest(**fields, height=height, width=width, seed=seed if i == 0 else seed + i)
                for i in range(n)]
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    request_id = body.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError("request_id must be a string")
    return requests, {"request_id": request_id, "timeout": timeout}


PARAMETERS = ("prompt", "negative_prompt", "steps", "guidance", "true_cfg_scale", "max_sequence_length", "model",
              "layout", "parallel", "dtype", "attention_backend")


def encode_response(result) -> dict:
    """The answer to a finished job (JobResult): OpenAI's {created, data: [{b64_json}]}, plus the id,
    the seed of every image, the parameters used and timings. CPU-heavy (PNG): run off the event loop."""
    first = result.results[0].params
    return {
        "id": result.id,
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(png_bytes(r.image, r.params)).decode("ascii"), "seed": r.params["seed"]}
                 for r in result.results],
        "seed": first["seed"],
        "size": f"{first['width']}x{first['height']}",
        "parameters": {k: first.get(k) for k in PARAMETERS},
        "timings": {"queue_s": round(result.queue_s, 4), "generate_s": round(result.generate_s, 4),
                    "total_s": round(result.total_s, 4)},
    }


def error_body(message: str, kind: str, status: int) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "code": status}}
