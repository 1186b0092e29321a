"""engine.image_io: output path checks, atomic PNG save, metadata round trip."""
import os

import pytest
from PIL import Image

from engine.image_io import read_png_params, resolve_output_path, save_png

PARAMS = {
    "prompt": "a red fox in snow, \u96ea\u306e\u4e2d\u306e\u72d0",  # non-Latin-1 → iTXt
    "negative_prompt": "blurry",
    "steps": 4,
    "guidance": 3.5,
    "seed": 1234,
    "size": [64, 32],
    "model": "tiny/model",
    "parallel": {"ulysses": 2, "ring": 1},
}


def _image():
    return Image.new("RGB", (64, 32), (200, 80, 20))


def test_creates_missing_parent_folders(tmp_path):
    out = resolve_output_path(tmp_path / "a" / "b" / "img.png", overwrite=False)
    assert out.parent.is_dir() and not out.exists()


def test_refuses_existing_file_without_overwrite(tmp_path):
    target = tmp_path / "img.png"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        resolve_output_path(target, overwrite=False)
    assert resolve_output_path(target, overwrite=True) == target


def test_rejects_non_png_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        resolve_output_path(tmp_path / "img.jpg", overwrite=True)


def test_overwrite_replaces_file(tmp_path):
    target = tmp_path / "img.png"
    target.write_bytes(b"not a png")
    save_png(_image(), resolve_output_path(target, overwrite=True), PARAMS)
    with Image.open(target) as im:
        assert im.size == (64, 32)
    # No temporary files left next to the result.
    assert os.listdir(tmp_path) == ["img.png"]


def test_metadata_round_trip(tmp_path):
    target = save_png(_image(), tmp_path / "img.png", PARAMS)
    assert read_png_params(target) == PARAMS
    with Image.open(target) as im:
        im.load()
        line = im.text["parameters"]
    assert "\n" not in line
    for piece in ("Prompt: a red fox", "Negative prompt: blurry", "Steps: 4",
                  "Guidance: 3.5", "Seed: 1234", "Size: 64x32", "Model: tiny/model",
                  "ring=1 ulysses=2"):
        assert piece in line


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_png(_image(), tmp_path / "img.png", {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_read_params_of_foreign_png(tmp_path):
    target = tmp_path / "plain.png"
    _image().save(target)
    with pytest.raises(ValueError, match="no 'shardiff' metadata"):
        read_png_params(target)


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "img.png"
    target.write_bytes(b"previous result")
    image = _image()

    def crash(fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_png(image, target, PARAMS)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["img.png"]
