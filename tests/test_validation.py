"""engine/validation.py and engine/request_check.py, the one set of request checks of the CLI, the Python API and the server: what
a new user tries (nan guidance, a seed beyond 64 bits, an output that cannot be written, a size that
cannot fit) is one line up front."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import GenerateRequest
from engine.image_io import resolve_output_path
from engine.loading import inspect_model
from engine.models import family
from engine.request_check import check_request
from engine.validation import SEED_MAX, needed_bytes
from shardiff_parallel.config import ParallelConfig

from test_cli_errors import FAST, _assert_user_error, _run


@pytest.mark.parametrize("fields, fragment", [
    ({"guidance": math.nan}, "--guidance must be a finite number, got nan"),
    ({"guidance": math.inf}, "--guidance must be a finite number, got inf"),
    ({"true_cfg_scale": -1.0}, "--true-cfg-scale must be ≥ 0"),
    ({"seed": SEED_MAX + 1}, "--seed must be an integer from 0 to 2**64 - 1"),
    ({"seed": -1}, "--seed must be an integer from 0 to 2**64 - 1"),
    ({"seed": 1.5}, "--seed must be an integer"),
    ({"steps": 0}, "--steps must be a positive integer"),
    ({"steps": True}, "--steps must be an integer"),
    ({"height": -64}, "--height must be a positive integer"),
    ({"prompt": []}, "prompt must be a string"),
])
def test_bad_fields_are_one_line_value_errors(fields, fragment):
    with pytest.raises(ValueError) as e:
        GenerateRequest(**{"prompt": "a fox", **fields})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_largest_seed_is_taken():
    assert GenerateRequest(prompt="a fox", seed=SEED_MAX).seed == SEED_MAX
    torch.Generator("cpu").manual_seed(SEED_MAX)  # what the engine does with it


def test_memory_rule_counts_the_split_and_refuses_what_cannot_fit():
    info = inspect_model("flux-dev")
    fam = family(info.family)
    r = GenerateRequest(prompt="a fox", height=4096, width=4096)
    kwargs = fam.call_kwargs(r)
    one, what = needed_bytes(r, info, fam, kwargs, ParallelConfig(), 4096, 4096, torch.bfloat16)
    four, _ = needed_bytes(r, info, fam, kwargs, ParallelConfig(ulysses=4), 4096, 4096, torch.bfloat16)
    # 65536 image tokens × 3072 wide × (2 + 4) × 2 bytes = 2.25 GiB on one rank; a quarter on four.
    assert one == 65536 * 3072 * 6 * 2 and four == one // 4 and "denoiser" in what
    assert check_request(r, info, fam, ParallelConfig(), dtype=torch.bfloat16, memory_bytes=3 * 2**30).height == 4096
    with pytest.raises(ValueError, match=r"needs at least 2\.2 GiB on each rank .* more than the 1\.0 GiB"):
        check_request(r, info, fam, ParallelConfig(), dtype=torch.bfloat16, memory_bytes=2**30)
    huge = GenerateRequest(prompt="a fox", height=2**20, width=2**20)
    with pytest.raises(ValueError, match="--height 1048576 --width 1048576 needs at least"):
        check_request(huge, info, fam, ParallelConfig(ulysses=4), dtype=torch.bfloat16, memory_bytes=80 * 2**30)


def test_an_output_that_cannot_be_written_is_refused_before_generation(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        resolve_output_path(blocker / "x.png", overwrite=False)
    with pytest.raises(ValueError, match="cannot be written"):
        resolve_output_path("/proc/shardiff-x.png", overwrite=False)


def test_cli_refuses_nan_guidance_once(tmp_path):
    r = _run([*FAST, "--guidance", "nan", "--output", str(tmp_path / "x.png")])
    _assert_user_error(r, "--guidance must be a finite number, got nan")


def test_cli_refuses_an_unwritable_output_once_before_generating(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _run([*FAST, "--output", str(blocker / "x.png")], nproc=2)
    _assert_user_error(r, "cannot be written")
    assert "shardiff: saved" not in r.stdout
