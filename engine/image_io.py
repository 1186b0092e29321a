"""Saving generated images: PNG only, with the generation parameters embedded.

Two text chunks go into every PNG:
- "parameters": one human-readable line (what image viewers and web UIs show);
- "shardiff": json.dumps(params, sort_keys=True), the exact record, read back by
  read_png_params().
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

PARAMS_KEY = "shardiff"
SUMMARY_KEY = "parameters"

# Order and labels of the one-line summary; keys missing from params are skipped.
_SUMMARY_FIELDS = (
    ("prompt", "Prompt"),
    ("negative_prompt", "Negative prompt"),
    ("steps", "Steps"),
    ("guidance", "Guidance"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("pipeline", "Pipeline"),
    ("parallel", "Parallel"),
)


def image_sha256(image: Image.Image) -> str:
    """Hash of an image's decoded pixels (mode, size, bytes): the same for the same picture whether it
    came as a path or a PIL image, and whatever the file's encoding — what an input image's record in
    the PNG metadata names."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def resolve_output_path(path: str | Path, *, overwrite: bool) -> Path:
    """Check `path` before spending minutes on generation; create its parent folders.

    We only write PNG, so a different suffix is an error rather than silently
    becoming "x.jpg.png" or a PNG named ".jpg".
    """
    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        raise ValueError(
            f"output {str(path)!r} must end in .png; shardiff only writes PNG files")
    if p.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name ending in .png")
    if p.exists() and not overwrite:
        raise ValueError(f"output {str(path)!r} exists; pass --overwrite to replace it")
    # save_png writes a temporary file next to `p` and renames it: probe exactly that, so that a
    # read-only or uncreatable folder is one line now, not a traceback after the last step.
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"output {str(path)!r} cannot be written: {e.strerror or e} ({p.parent})") from None
    return p


def summary_line(params: dict[str, Any]) -> str:
    """'Prompt: a cat, Negative prompt: ..., Steps: 28, ...' for the tEXt chunk."""
    parts = []
    for key, label in _SUMMARY_FIELDS:
        value = params.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, (list, tuple)) and key == "size":
            value = "x".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in sorted(value.items()))
        # A newline would break the "one line" promise of this chunk.
        parts.append(f"{label}: {' '.join(str(value).split())}")
    return ", ".join(parts)


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> Path:
    """Write `image` to `path` atomically with `params` embedded; returns `path`.

    Writes a temporary file in the same folder and os.replace()s it, so a crash or
    Ctrl-C never leaves half a PNG under the final name (and replace is atomic
    only within one file system, hence the same folder).
    """
    path = Path(path)
    info = png_info(params)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; images are meant to be shared like any output file.
        # (Reading the umask would mean changing it, racing other threads.)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def png_info(params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The two text chunks of the module doc, for `params`."""
    record = json.dumps(params, sort_keys=True)  # fails early on non-JSON params
    info = PngImagePlugin.PngInfo()
    _add_text(info, SUMMARY_KEY, summary_line(params))
    _add_text(info, PARAMS_KEY, record)
    return info


def png_bytes(image: Image.Image, params: dict[str, Any]) -> bytes:
    """`image` as PNG bytes with `params` embedded, exactly as save_png writes it (the server's answer)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params))
    return buffer.getvalue()


def read_png_params(path: str | Path) -> dict[str, Any]:
    """The params dict save_png() embedded; ValueError if the file has none."""
    with Image.open(path) as im:
        im.load()  # text chunks after the image data are only seen once loaded
        record = im.text.get(PARAMS_KEY) if hasattr(im, "text") else None
    if record is None:
        raise ValueError(f"{str(path)!r} has no {PARAMS_KEY!r} metadata; not written by shardiff?")
    return json.loads(record)


def _add_text(info: PngImagePlugin.PngInfo, key: str, value: str) -> None:
    # tEXt is Latin-1 only; prompts often are not, so fall back to UTF-8 iTXt.
    # Both read back the same through PIL's Image.text.
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt(key, value)
    else:
        info.add_text(key, value)
