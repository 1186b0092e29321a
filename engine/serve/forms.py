"""An edit's multipart form (OpenAI's `client.images.edit`) as the same dict a JSON body gives.

Files (`image`, `image[]`, `mask`; any of the image fields) arrive as bytes; every other part is text,
converted to the type its JSON form has — so `extra_body={"seed": 7, "num_inference_steps": 4}` (text
in a form) is checked exactly like `{"seed": 7, "num_inference_steps": 4}` in JSON. OpenAI's client
writes booleans as "true" / "false", lists as repeated `name[]` parts and None as an empty part
(dropped here, as a JSON null is).
"""

from __future__ import annotations

import json
import math

INTEGERS = ("n", "seed", "num_inference_steps", "max_sequence_length", "output_compression", "partial_images",
            "control_mode")
NUMBERS = ("guidance_scale", "true_cfg_scale", "strength", "pag_scale", "timeout")
BOOLEANS = ("stream", "keep_image_size")
MAX_FILES = 8
MAX_FIELDS = 64


def _integer(name: str, text: str) -> int:
    t = text.strip()
    if not (t.lstrip("+-").isdigit() and len(t) <= 40):
        raise ValueError(f"{name} must be an integer, got {text[:40]!r}")
    return int(t)


def _number(name: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text[:40]!r}") from None
    return int(v) if v.is_integer() and math.isfinite(v) and "." not in text and "e" not in text.lower() else v


def _boolean(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {text[:40]!r}")
    return t in ("true", "1")


def convert(name: str, text: str):
    """A text part as its field's JSON type (`lora`: JSON text); ValueError naming the field."""
    if name in INTEGERS:
        return _integer(name, text)
    if name in NUMBERS:
        return _number(name, text)
    if name in BOOLEANS:
        return _boolean(name, text)
    if name == "lora":
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"lora must be JSON text such as {{\"style\": 0.8}}, got {text[:40]!r}") from None
    if name == "controlnet_scale":
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"controlnet_scale must be a number or a JSON list of numbers, "
                             f"got {text[:40]!r}") from None
        return value
    return text


async def form_body(request) -> dict:
    """The edit form of `request` as a body dict (files: bytes; `image[]`: a list); ValueError."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    except (MultiPartException, HTTPException) as e:
        raise ValueError(f"the multipart form cannot be read: {getattr(e, 'detail', None) or e}") from None
    body: dict = {}
    try:
        for key in dict.fromkeys(form.keys()):
            values = form.getlist(key)
            name, many = (key[:-2], True) if key.endswith("[]") else (key, False)
            parsed = []
            for value in values:
                if isinstance(value, UploadFile):
                    parsed.append(await value.read())
                elif value != "":
                    parsed.append(convert(name, value))
            if not parsed:
                continue
            if name in body:
                raise ValueError(f"{name} is given twice")
            if many or (name == "image" and len(parsed) > 1):
                body[name] = parsed
            elif len(parsed) > 1:
                raise ValueError(f"{name} is given {len(parsed)} times; give it once")
            else:
                body[name] = parsed[0]
    finally:
        await form.close()
    return body
