"""The HTTP requests and answers of `POST /v1/images/generations` and `/v1/images/edits`: OpenAI's
fields as OpenAI's Python client sends them, plus ours.

OpenAI's: `prompt`, `n`, `size` ("WxH" or "auto"), `response_format` ("b64_json"), `model` (if given,
the served model's name), `output_format` (png / jpeg / webp) and `output_compression` (jpeg / webp:
the encoder's quality, 0–100), `background` (auto / opaque: the models draw opaque images),
`quality` (auto / low / medium / high: a step count, `QUALITY`), `stream` and `partial_images` (0–3),
and — accepted, ignored — `moderation`, `style`, `user`, `safety_identifier`. Edits: `image` (one or
several reference images, in order: a list, or `image[]` parts of the form; more than the model's
pipelines take is refused naming its maximum) and `mask` (transparent = edit, as OpenAI's; a mask
without alpha: white = edit, as diffusers').
Ours: `negative_prompt`, `seed`, `num_inference_steps`, `guidance_scale`, `true_cfg_scale`,
`max_sequence_length`, `timeout` (seconds, at most the server's --request-timeout), `request_id` (the
id to cancel it by), `lora` (the server's named adapters to run with, {"NAME": SCALE}: checked by the
controller, `check_lora`), and the editing pipelines' `image` (one, or a list of reference images),
`mask_image`, `control_image` (base64 or a data: URL of a PNG, JPEG or WebP file; never a path on the
server), `strength`, `pag_scale`,
`keep_image_size`, `controlnet_scale`, `control_mode`. Any other field is refused, by name.

`n` images are `n` requests with the seeds seed, seed + 1, …, as the CLI's --num-images. A request
without a seed gets one drawn by the controller, returned in the answer.
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from dataclasses import dataclass

from engine.config import GenerateRequest

from .encode import FORMATS, Encoding
from .errors import clean

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
OUTPUT_FIELDS = ("output_format", "output_compression", "background", "quality", "stream", "partial_images")
IGNORED = ("user", "moderation", "style", "safety_identifier")
"""Accepted for OpenAI's clients, and ignored (documented)."""
OTHER_FIELDS = ("n", "size", "response_format", "model", "seed", "timeout", "request_id", "lora", *IGNORED)
EDIT_FIELDS = ("mask",)
DEFAULT_STEPS = GenerateRequest.__dataclass_fields__["steps"].default
QUALITY = {"low": 0.25, "medium": 0.5, "high": 1.0}
"""quality → share of the default steps (28: low 7, medium 14, high 28); auto: the default.
num_inference_steps, when given, wins."""
MAX_PARTIAL_IMAGES = 3
SEED_DRAWN_BELOW = 2**32
"""Drawn seeds fit 32 bits: every client's integers (JavaScript's included) hold them exactly."""


@dataclass(frozen=True)
class Output:
    """How the answer is made: the format, and (streaming) how many partial images."""

    encoding: Encoding = Encoding()
    stream: bool = False
    partial_images: int = 0
    quality: str | None = None
    """The quality asked for (echoed in the answer), or None."""
    edit: bool = False


def draw_seed() -> int:
    return secrets.randbelow(SEED_DRAWN_BELOW)


def parse_size(size) -> tuple[int | None, int | None]:
    """"WxH" → (height, width); None or "auto" → the model's default size (an edit: the input's)."""
    if size is None or size == "auto":
        return None, None
    if not isinstance(size, str):
        raise ValueError(f"size must be a string \"WIDTHxHEIGHT\" such as \"1024x1024\", got {size!r}")
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 7 for p in parts):
        raise ValueError(f"size must be \"WIDTHxHEIGHT\" such as \"1024x1024\" (or \"auto\"), got {size[:40]!r}")
    width, height = (int(p) for p in parts)
    return height, width


def decode_image(value, name: str, *, max_pixels: int):
    """The PIL image in a field: base64 text (or a data: URL), or a multipart file's bytes; ValueError
    naming the field. Larger than `max_pixels`: refused before its pixels are decoded."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str):
        if value.startswith("data:"):
            header, _, value = value.partition(",")
            if not header.endswith(";base64"):
                raise ValueError(f"{name}: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name} is not valid base64") from None
    elif not isinstance(value, bytes):
        raise ValueError(f"{name} must be a base64 string (or a data: URL) of a PNG, JPEG or WebP image, "
                         f"got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as im:  # the header only: size and format, no pixels yet
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise ValueError(f"{name} is a {im.format} image; send PNG, JPEG or WebP")
            if im.width * im.height > max_pixels:
                raise ValueError(f"{name} is {im.width}x{im.height}, more than this server's --max-input-pixels "
                                 f"{max_pixels}")
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name} cannot be read as an image ({clean(str(e))})") from None


def openai_mask(mask):
    """An OpenAI mask (transparent = edit) as the pipelines' (white = repaint); without alpha: as it is."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode not in ("RGBA", "LA", "PA"):
        return mask
    return mask.getchannel("A").point(lambda a: 255 if a == 0 else 0)


def parse_output(body: dict, *, edit: bool) -> Output:
    fmt = body.get("output_format") or "png"
    if fmt not in FORMATS:
        raise ValueError(f"output_format {str(fmt)[:40]!r} is not supported; use png, jpeg or webp")
    compression = body.get("output_compression")
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
            raise ValueError(f"output_compression must be an integer from 0 to 100, got {compression!r}")
        if fmt == "png":
            raise ValueError("output_compression is for output_format jpeg or webp (png is lossless)")
    background = body.get("background") or "auto"
    if background == "transparent":
        raise ValueError("background \"transparent\" is not supported: this model draws opaque RGB images; "
                         "use auto or opaque")
    if background not in ("auto", "opaque"):
        raise ValueError(f"background must be auto or opaque, got {str(background)[:40]!r}")
    quality = body.get("quality") or "auto"
    if quality != "auto" and quality not in QUALITY:
        raise ValueError(f"quality must be auto, low, medium or high, got {str(quality)[:40]!r}")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be true or false, got {stream!r}")
    partial = body.get("partial_images")
    if partial is not None:
        if isinstance(partial, bool) or not isinstance(partial, int) or not 0 <= partial <= MAX_PARTIAL_IMAGES:
            raise ValueError(f"partial_images must be an integer from 0 to {MAX_PARTIAL_IMAGES}, got {partial!r}")
        if not stream:
            raise ValueError("partial_images is for streamed requests: add \"stream\": true")
    return Output(Encoding(fmt, compression), stream, partial or 0, None if quality == "auto" else quality, edit)


def parse_body(body, *, model: str, max_images: int, max_input_pixels: int = 4096 * 4096,
               edit: bool = False, max_input_images: int | None = None) -> tuple[list[GenerateRequest], dict]:
    """(one GenerateRequest per image, options: request_id, timeout, output) from a JSON body or an
    edit's form (files as bytes); ValueError. `max_input_images`: the most reference images the model's
    pipelines take (engine/pipelines.max_input_images; None: left to the request check)."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object such as {\"prompt\": \"a red fox\"}")
    known = [*FIELDS, *SCALARS, *IMAGES, *OUTPUT_FIELDS, *OTHER_FIELDS, *(EDIT_FIELDS if edit else ())]
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(repr(u[:40]) for u in unknown[:5])}; this server takes "
                         f"{', '.join(sorted(known))}")
    if "prompt" not in body:
        raise ValueError("prompt is missing")
    if not isinstance(body["prompt"], str):
        raise ValueError(f"prompt must be a string, got {type(body['prompt']).__name__}")
    if body.get("response_format") not in (None, "b64_json"):
        raise ValueError(f"response_format {str(body['response_format'])[:40]!r} is not supported; use \"b64_json\" "
                         "(images are returned in the answer, never stored)")
    if body.get("model") not in (None, model):
        raise ValueError(f"this server serves the model {model!r}, not {str(body['model'])[:100]!r}")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
        raise ValueError(f"n must be an integer from 1 to {max_images}, got {n!r}")
    output = parse_output(body, edit=edit)
    height, width = parse_size(body.get("size"))
    seed = body.get("seed")
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, int) and not isinstance(seed, bool) and seed <= 2**64 - 1 < seed + n - 1:
        raise ValueError(f"seed {seed} with n {n} runs past 2**64 - 1 (image i uses seed + i)")
    fields = {ours: body[theirs] for theirs, ours in {**FIELDS, **SCALARS}.items() if body.get(theirs) is not None}
    if output.quality is not None and "steps" not in fields:
        fields["steps"] = max(1, round(DEFAULT_STEPS * QUALITY[output.quality]))
    images = dict(body)
    if edit:
        images.update(_edit_images(body))
    check_image_count(images.get("image"), max_input_images)
    for name in IMAGES:
        value = images.get(name)
        if isinstance(value, list) and name == "image":
            fields[name] = [decode_image(v, f"{name}[{i}]", max_pixels=max_input_pixels) for i, v in enumerate(value)]
        elif value is not None:
            fields[name] = decode_image(value, name, max_pixels=max_input_pixels)
    if edit and body.get("mask") is not None:
        fields["mask_image"] = openai_mask(fields["mask_image"])
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
    return requests, {"request_id": request_id, "timeout": timeout, "output": output, "lora": body.get("lora")}


def check_image_count(image, most: int | None) -> None:
    """`image`: one image, or a list of reference images; no more than `most` (the model's maximum)."""
    if not isinstance(image, list):
        return
    if not image:
        raise ValueError("image is an empty list; give one image, or several")
    if most is not None and 1 <= most < len(image):
        raise ValueError(f"this model takes {most} input image, got {len(image)}; send one" if most == 1 else
                         f"this model takes up to {most} input images, got {len(image)}")


def _edit_images(body: dict) -> dict:
    """An edit's `image` (one, or a list of reference images: one alone stays one) and `mask`, as the
    request's image and mask_image."""
    image = body.get("image")
    if image is None or image == []:
        raise ValueError("an edit needs an image (the image to edit)")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if body.get("mask_image") is not None and body.get("mask") is not None:
        raise ValueError("give mask or mask_image, not both")
    return {"image": image, "mask_image": body.get("mask", body.get("mask_image"))}


def check_lora(value, adapters: dict) -> dict:
    """A request's `lora`: {name: scale} (a scale None: the adapter's own), or a list of names, or None /
    {} for none → {name: scale}; ValueError naming what is wrong (an unknown name lists the known)."""
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        value = dict.fromkeys(value)
    if not isinstance(value, dict):
        raise ValueError("lora must be an object {\"NAME\": SCALE, …} (or a list of names)")
    out = {}
    for name, scale in value.items():
        if not isinstance(name, str) or name not in adapters:
            known = ", ".join(sorted(adapters)) or "none (start it with --lora NAME=PATH)"
            raise ValueError(f"lora: no adapter named {str(name)[:64]!r}; this server has {known}")
        if scale is None:
            scale = adapters[name].scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"lora: the scale of {name!r} must be a finite number, got {scale!r}")
        out[name] = float(scale)
    return out


PARAMETERS = ("prompt", "negative_prompt", "steps", "guidance", "true_cfg_scale", "max_sequence_length", "model",
              "layout", "parallel", "dtype", "attention_backend", "quantize", "quantize_qkv")


def usage(results: list, requests: list, spatial_multiple: int) -> dict:
    """OpenAI's usage, in the denoiser's image tokens (one per spatial_multiple² pixels: 16² for Flux):
    the output images' and the input images'. Text tokens are not counted (0)."""
    def tokens(width, height):
        return (width // spatial_multiple) * (height // spatial_multiple)

    out = sum(tokens(r.params["width"], r.params["height"]) for r in results)
    images = [im for req in requests[:1] for field in (req.image, req.control_image)
              for im in (field if isinstance(field, list) else [field]) if im is not None]
    inputs = sum(tokens(*im.size) for im in images)
    return {"input_tokens": inputs, "input_tokens_details": {"image_tokens": inputs, "text_tokens": 0},
            "output_tokens": out, "total_tokens": inputs + out}


def encode_response(result, output: Output = Output(), usage_: dict | None = None) -> dict:
    """The answer to a finished job (JobResult of Encoded results, engine/serve/protocol.py): OpenAI's
    {created, data: [{b64_json}], background, output_format, quality, size, usage}, plus the id, the
    seed of every image, the parameters used and timings."""
    first = result.results[0].params
    answer = {
        "id": result.id,
        "created": int(time.time()),
        # With --cache, which steps each image computed and which it reused (docs/FAST_PATH.md).
        "data": [{"b64_json": r.b64, "seed": r.params["seed"],
                  **({"cache": r.params["cache"]} if r.params.get("cache") else {})} for r in result.results],
        "background": "opaque",
        "output_format": output.encoding.format,
        **({"quality": output.quality} if output.quality else {}),
        "seed": first["seed"],
        "size": f"{first['width']}x{first['height']}",
        "parameters": {k: first.get(k) for k in PARAMETERS},
        "lora": result.lora,
        "group": result.group,
        "timings": {"queue_s": round(result.queue_s, 4), "lora_s": round(result.lora_s, 4),
                    "generate_s": round(result.generate_s, 4), "encode_s": round(result.encode_s, 4),
                    "total_s": round(result.total_s, 4)},
    }
    if usage_ is not None:
        answer["usage"] = usage_
    return answer


def error_body(message: str, kind: str, status: int) -> dict:
    """OpenAI's error shape; the message cleaned of addresses, paths and ports (engine/serve/errors.py)."""
    return {"error": {"message": clean(message), "type": kind, "code": status}}
