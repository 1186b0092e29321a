"""The installed names: our wheel holds no top-level package that another well-known distribution owns,
and it installs beside Hugging Face's `kernels` in either order, both importable, neither touching the
other's files (what `pip uninstall` removes is each wheel's RECORD).

Builds our wheel (no build isolation: setuptools is in the test environment) and downloads Hugging
Face's `kernels` wheel from the package index, as a user's `pip install kernels` would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF_KERNELS = "kernels==0.17.2"
# Top-level import names that other distributions own (Hugging Face's hub
# kernels, imported by transformers' use_kernels and diffusers' hub attention backends; PyPI's `parallel`)
# or that sloppy wheels ship at the top level and would collide with ours.
OWNED_ELSEWHERE = {"kernels", "parallel", "utils", "models", "tests", "bench", "benchmarks", "scripts"}
OURS = {"engine", "launch", "shardiff_kernels", "shardiff_parallel"}


def _pip(*args, cwd=None):
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"pip {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheels")
    src = tmp / "src"
    # Build from a copy of the tracked sources, so that no build/ or egg-info lands in the checkout.
    for f in _tracked():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "ours"), str(src))
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp / "hf"), HF_KERNELS)
    (ours,) = (tmp / "ours").glob("shardiff-*.whl")
    (theirs,) = (tmp / "hf").glob("kernels-*.whl")
    return ours, theirs


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if ".dist-info/" not in n]


def test_wheel_top_level_names_are_ours_and_complete(wheels):
    ours, _ = wheels
    names = _names(ours)
    top = {n.split("/")[0] for n in names}
    assert top == OURS, top
    assert not top & OWNED_ELSEWHERE
    # Every module of the source folders is in the wheel, under its import name.
    folders = {"engine": "engine", "launch": "launch", "kernels": "shardiff_kernels", "parallel": "shardiff_parallel"}
    for f in _tracked():
        folder, _, rel = f.partition("/")
        if folder in folders and f.endswith(".py"):
            assert f"{folders[folder]}/{rel}" in names, f"{f} is missing from the wheel (pyproject.toml packages)"
    assert "engine/assets/shapes/transformer/diffusion_pytorch_model.safetensors" in names


@pytest.mark.parametrize("order", ["ours-first", "theirs-first"])
def test_installs_beside_hugging_face_kernels(wheels, tmp_path, order):
    ours, theirs = wheels
    target = tmp_path / "site"
    for wheel in (ours, theirs) if order == "ours-first" else (theirs, ours):
        _pip("install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel))
    assert not set(_names(ours)) & set(_names(theirs)), "the two wheels share files"
    # Run from the repository root: its kernels/ folder is on sys.path there (cwd first), the worst case.
    probe = (
        "import inspect, kernels, shardiff_kernels.registry as r, shardiff_parallel.plan as p\n"
        "from kernels import get_kernel\n"
        "print(inspect.getsourcefile(get_kernel)); print(r.__file__); print(p.__file__)\n"
        "print(r.choose_kernel('auto', 'cpu', __import__('torch').float32, need_lse=True).name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    hf_file, our_kernels, our_parallel, chosen = out.stdout.split()
    assert Path(hf_file).is_relative_to(target / "kernels"), hf_file
    assert Path(our_kernels).is_relative_to(target / "shardiff_kernels"), our_kernels
    assert Path(our_parallel).is_relative_to(target / "shardiff_parallel"), our_parallel
    assert chosen
    # Removing one distribution's files (what pip uninstall does, from its RECORD) leaves the other whole.
    for name in _names(theirs):
        (target / name).unlink()
    out = subprocess.run([sys.executable, "-c", "import shardiff_kernels.registry, engine.models"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
