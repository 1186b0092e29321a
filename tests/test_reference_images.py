"""Several reference images, end to end without a pipeline call: `GenerateRequest.image` as a list, the
request check (each pipeline form's `max_images`, refused before any collective), the records and
hashes the PNG metadata carries, the command line's repeatable `--image`, and the HTTP bodies (a JSON
list, `image[]` parts of an edit's form, the model's maximum as a 400's message). Small and in process.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from engine.config import GenerateRequest


def _image(seed: int, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    paths = []
    for i in range(3):
        paths.append(str(root / f"ref{i}.png"))
        _image(i, (64 + 16 * i, 48)).save(paths[-1])
    return paths


def _req(**kw):
    return GenerateRequest(prompt="a cat", steps=2, height=64, width=64, **kw)


def _several(family, cls: str, most: int):
    """`family` with its pipeline `cls` taking up to `most` reference images (the mechanism alone, on a
    pipeline whose call is never made here)."""
    return dataclasses.replace(family, pipelines=tuple(
        dataclasses.replace(p, max_images=most) if p.cls == cls else p for p in family.pipelines))


def test_request_fields_take_one_image_or_a_list(files):
    assert _req(image=files[0]).image == files[0]
    assert _req(image=tuple(files)).image == files  # a tuple becomes the list
    for kw, msg in [
        (dict(image=[]), "--image: an empty list"),
        (dict(image=[files[0], 3]), "--image must be paths or PIL images, got a int in the list"),
        (dict(mask_image=[files[0]], image=files[0]), "--mask-image must be a path or a PIL image, got list"),
        (dict(control_image=files), "--control-image must be a path or a PIL image, got list"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _req(**kw)
    as_dict = _req(image=[files[0], _image(7)]).to_dict()
    assert as_dict["image"][0] == files[0] and as_dict["image"][1].startswith("<PIL RGB 40x24 sha256:")


def test_the_request_check_counts_the_references_of_the_chosen_pipeline(files):
    from shardiff_parallel.config import ParallelConfig

    from engine.image_io import image_sha256
    from engine.loading import inspect_model
    from engine.models import family
    from engine.pipelines import max_input_images
    from engine.request_check import check_request

    flux, info, layout = family("flux"), inspect_model("flux-tiny"), ParallelConfig()
    # A pipeline that takes one image: a list of several is refused by the request check, which runs
    # before the first collective; a list of one is that one image.
    with pytest.raises(ValueError, match="--image: FluxImg2ImgPipeline takes one input image, got 3"):
        check_request(_req(image=files), info, flux, layout)
    one = check_request(_req(image=[files[1]]), info, flux, layout)
    assert isinstance(one.kwargs["image"], Image.Image) and one.records["image"][0]["path"] == files[1]
    assert max_input_images(flux, "FluxPipeline") == 1 and max_input_images(family("sana"), "SanaPipeline") == 0

    several = _several(flux, "FluxImg2ImgPipeline", 3)
    assert max_input_images(several, "FluxPipeline") == 3
    pil = _image(9)
    checked = check_request(_req(image=[files[2], pil, files[0]]), info, several, layout)
    images = checked.kwargs["image"]
    assert [im.size for im in images] == [(96, 48), (40, 24), (64, 48)]  # in order, each at its own size
    records = checked.records["image"]
    assert [r.get("path") for r in records] == [files[2], None, files[0]]
    assert [r["sha256"] for r in records] == [image_sha256(im) for im in images]
    # The ranks compare every reference's hash; the PNG's request names every reference.
    agreed = checked.agreed_form()
    assert agreed["inputs"]["image"] == records and agreed["image"][0] == files[2]
    with pytest.raises(ValueError, match="--image: FluxImg2ImgPipeline takes at most 3 input images, got 4"):
        check_request(_req(image=[*files, pil]), info, several, layout)
    # The inpainting form still takes one: a mask picks it, and the count is its own.
    with pytest.raises(ValueError, match="--image: FluxInpaintPipeline takes one input image, got 2"):
        check_request(_req(image=files[:2], mask_image=files[0]), info, several, layout)
    # No size given: the first reference's, rounded down to the model's multiple (16).
    sized = check_request(GenerateRequest(prompt="x", steps=2, image=[files[2], files[0]]), info, several, layout)
    assert (sized.height, sized.width) == (48, 96)


def test_the_command_line_repeats_image(files):
    from engine.batch_cli import requests_from_args
    from engine.generate import build_parser

    parser = build_parser()
    assert requests_from_args(parser.parse_args([]))[0].image is None
    assert requests_from_args(parser.parse_args(["--image", files[0]]))[0].image == files[0]
    args = parser.parse_args(["--image", files[2], "--image", files[0], "--num-images", "2"])
    assert [r.image for r in requests_from_args(args)] == [[files[2], files[0]]] * 2


def test_http_bodies_carry_several_images(files):
    from engine.serve import api
    from engine.serve.client import encode_images, request_body

    a, b, c = _image(1), _image(2, (32, 32)), _image(3, (16, 48))
    b64 = [base64.b64encode(_png(im)).decode() for im in (a, b, c)]
    (request,), _ = api.parse_body({"prompt": "x", "image": b64}, model="m", max_images=1)
    assert [np.asarray(im).tolist() for im in request.image] == [np.asarray(im).tolist() for im in (a, b, c)]
    with pytest.raises(ValueError, match=r"image\[1\] is not valid base64"):
        api.parse_body({"prompt": "x", "image": [b64[0], "&&"]}, model="m", max_images=1)
    with pytest.raises(ValueError, match="image is an empty list"):
        api.parse_body({"prompt": "x", "image": []}, model="m", max_images=1)
    # The model's maximum, named before anything is decoded.
    with pytest.raises(ValueError, match="this model takes 1 input image, got 3; send one"):
        api.parse_body({"prompt": "x", "image": b64}, model="m", max_images=1, edit=True, max_input_images=1)
    with pytest.raises(ValueError, match="this model takes up to 2 input images, got 3"):
        api.parse_body({"prompt": "x", "image": b64}, model="m", max_images=1, max_input_images=2)
    (edit,), _ = api.parse_body({"prompt": "x", "image": b64[:2]}, model="m", max_images=1, edit=True,
                                max_input_images=3)
    assert len(edit.image) == 2
    (alone,), _ = api.parse_body({"prompt": "x", "image": b64[:1]}, model="m", max_images=1, edit=True)
    assert isinstance(alone.image, Image.Image)  # one image sent as a list of one is that image
    # The Python clients send a list of PIL images / paths as a list of base64 files.
    body = request_body(GenerateRequest(prompt="x", image=[a, files[0]]))
    assert body["image"][0] == b64[0] and base64.b64decode(body["image"][1]) == open(files[0], "rb").read()
    assert encode_images(body) == body
    # Usage counts every reference's tokens.
    result = type("R", (), {"params": {"width": 64, "height": 64}})()
    assert api.usage([result], [request], 16)["input_tokens"] == 2 * 1 + 2 * 2 + 1 * 3


def test_an_edit_form_takes_image_parts_several_times():
    import httpx
    from starlette.requests import Request

    from engine.serve import api
    from engine.serve.forms import form_body

    images = [_image(1), _image(2)]

    def form(*parts):
        built = httpx.Request("POST", "http://x/v1/images/edits", data={"prompt": "x", "seed": "3"},
                              files=[(name, (f"{i}.png", _png(im), "image/png")) for i, (name, im) in enumerate(parts)])
        body = built.read()
        sent = [False]

        async def receive():
            if sent[0]:
                return {"type": "http.disconnect"}
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]
        return asyncio.run(form_body(Request({"type": "http", "method": "POST", "headers": headers}, receive)))

    for name in ("image[]", "image"):
        body = form(*[(name, im) for im in images])
        assert len(body["image"]) == 2 and body["seed"] == 3
        (request,), _ = api.parse_body(body, model="m", max_images=1, edit=True, max_input_images=2)
        assert [np.asarray(im).tolist() for im in request.image] == [np.asarray(im).tolist() for im in images]
        with pytest.raises(ValueError, match="this model takes 1 input image, got 2; send one"):
            api.parse_body(body, model="m", max_images=1, edit=True, max_input_images=1)
