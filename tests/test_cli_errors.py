"""The CLI on bad input: one clear `shardiff: error: ...` line, a non-zero exit, no traceback, no hang.

Real subprocesses: `torchrun` (torch.distributed.run) for the multi-rank cases, `python -m` otherwise.
Every run has a 90 s subprocess timeout and must end well before it. torchrun's own launcher prints a
ChildFailedError traceback of its own when a worker exits non-zero; that is the launcher, not us, and
is the only traceback allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


from engine.image_io import read_png_params

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 90  # subprocess limit: a hang fails the test instead of the CI job
QUICK = 60  # every run must end well before TIMEOUT
FAST = ["--model", "flux-tiny", "--steps", "2", "--height", "128", "--width", "128"]


def _run(args: list[str], nproc: int | None = None, module: str = "engine.generate", cwd: Path = REPO):
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if nproc is None:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", module, *args]
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    r.seconds = time.monotonic() - start
    return r


def _tracebacks(out: str) -> int:
    """Python tracebacks in `out`, not counting torchrun's own ChildFailedError report."""
    n = out.count("Traceback (most recent call last)")
    if "ChildFailedError" in out:
        n -= 1
    return n


def _assert_user_error(r, *fragments: str) -> str:
    out = r.stdout
    assert r.returncode != 0, out
    assert r.seconds < QUICK, f"took {r.seconds:.0f} s:\n{out}"
    errors = [line for line in out.splitlines() if "shardiff: error" in line]
    assert len(errors) == 1, f"expected the error once, got {len(errors)}:\n{out}"
    assert errors[0].startswith("shardiff: error: "), out
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    # No traceback for a user mistake: neither a Python one nor run_main's per-rank one.
    assert _tracebacks(out) == 0, out
    assert "[rank " not in out, out
    # No traceback through our own code (a venv inside the checkout is not our code).
    ours = [f'File "{REPO / pkg}' for pkg in ("engine", "parallel", "kernels", "launch")]
    assert not any(o in out for o in ours), out
    return errors[0]


# ------------------------------------------------------------------ multi-rank user mistakes


def test_degrees_not_matching_world_size(tmp_path):
    r = _run([*FAST, "--ulysses", "2", "--ring", "2", "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, "multiply to 4", "2 process(es) were launched", "--ulysses 2")
    assert not (tmp_path / "x.png").exists()


def test_heads_not_divisible_suggests_a_working_layout(tmp_path):
    # Ulysses shares heads unevenly (--ulysses 3 on 8 heads runs); TP must split them evenly.
    r = _run([*FAST, "--tp", "3", "--output", str(tmp_path / "x.png")], nproc=3)
    line = _assert_user_error(r, "8 attention heads", "--tp 3")
    assert "2, 4, 8" in line, line  # the TP degrees that split 8 heads


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    r = _run([*FAST, "--model", str(missing), "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, str(missing), "neither a known preset", "flux-tiny")


def test_size_not_a_multiple_of_16_names_valid_sizes(tmp_path):
    r = _run([*FAST, "--height", "120", "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, "--height 120", "multiple of 16", "112 or 128")
    assert not (tmp_path / "x.png").exists()


def test_invalid_request_value_reported_once(tmp_path):
    # Validated when the request is built from the command line, before any collective.
    r = _run([*FAST, "--width", "0", "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, "--width", "positive")


def test_zero_degree_reported_once(tmp_path):
    r = _run([*FAST, "--ring", "0", "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, "--ring", "positive")


# ------------------------------------------------------------------ single-process user mistakes


def test_directory_without_model_index(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    r = _run([*FAST, "--model", str(folder), "--output", str(tmp_path / "x.png")])
    _assert_user_error(r, "model_index.json", "missing")


def test_unknown_attention_backend(tmp_path):
    r = _run([*FAST, "--attention-backend", "no-such-kernel", "--output", str(tmp_path / "x.png")])
    _assert_user_error(r, "'no-such-kernel'", "auto", "sdpa")


def test_cuda_graphs_without_a_gpu(tmp_path):
    # CUDA_VISIBLE_DEVICES="" in _run: refused on both ranks before any collective, once.
    r = _run([*FAST, "--cuda-graphs", "--output", str(tmp_path / "x.png")], nproc=2)
    _assert_user_error(r, "--cuda-graphs needs CUDA GPUs")


def test_unknown_preset_lists_the_known_ones(tmp_path):
    r = _run([*FAST, "--model", "flux-tinyy", "--output", str(tmp_path / "x.png")])
    _assert_user_error(r, "'flux-tinyy'", "flux-dev", "flux-schnell", "flux-tiny")


def test_help_exits_zero_without_traceback():
    r = _run(["--help"])
    assert r.returncode == 0, r.stdout
    assert "--ulysses" in r.stdout and _tracebacks(r.stdout) == 0, r.stdout


# ------------------------------------------------------------------ happy path, then --overwrite


def test_two_ranks_write_png_then_refuse_and_overwrite(tmp_path):
    out = tmp_path / "new-folder" / "x.png"  # the folder does not exist yet
    r = _run([*FAST, "--seed", "7", "--output", str(out)], nproc=2)
    assert r.returncode == 0, r.stdout
    assert r.seconds < QUICK, r.stdout
    assert _tracebacks(r.stdout) == 0, r.stdout
    params = read_png_params(out)
    assert params["seed"] == 7
    assert params["layout"] == "ulysses2"
    assert params["parallel"] == {"dp": 1, "cfg": 1, "ring": 1, "ulysses": 2, "tp": 1}
    assert params["model"] == "flux-tiny" and params["size"] == [128, 128] and params["steps"] == 2
    before = out.read_bytes()

    # Same path again, no --overwrite: refused. Only rank 0 checks the path; the other rank must stop
    # with it quietly, not die in its next collective with a "connection reset" traceback.
    r = _run([*FAST, "--seed", "8", "--output", str(out)], nproc=2)
    _assert_user_error(r, "exists; pass --overwrite")
    assert out.read_bytes() == before

    # With --overwrite it is replaced (one process: layout "single").
    r = _run([*FAST, "--seed", "8", "--output", str(out), "--overwrite"])
    assert r.returncode == 0, r.stdout
    params = read_png_params(out)
    assert params["seed"] == 8 and params["layout"] == "single"
    assert not [p for p in out.parent.iterdir() if p.name != "x.png"]  # no temporary files left


# ------------------------------------------------------------------ a crash on one rank


def test_exception_on_one_rank_stops_the_job():
    r = _run([], nproc=2, module="tests.fault_worker")
    out = r.stdout
    assert r.returncode != 0, out
    assert r.seconds < QUICK, f"took {r.seconds:.0f} s:\n{out}"
    hits = [line for line in out.splitlines() if "injected fault on rank 1" in line]
    assert len(hits) == 1, out
    assert re.match(r"\[rank 1\] RuntimeError: injected fault on rank 1$", hits[0]), hits[0]
