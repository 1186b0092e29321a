"""`--tp auto`: tensor parallelism exactly when the weights do not fit one GPU (engine/loading/auto_tp.py).

The decision is counted from configs and safetensors headers (meta-device models), so it is tested
here with the real flux-dev / sd3.5-large configs and made-up GPU sizes; no GPU, nothing allocated.
"""

from __future__ import annotations

import pytest
import torch

from engine.loading.auto_tp import choose_tp, weight_bytes_per_rank
from engine.loading import inspect_model
from engine.models import family

GiB = 2**30


def _choose(model: str, gpu_gib: float | None, world: int, **kw):
    info = inspect_model(model)
    return choose_tp(model, info, family(info.family), world_size=world, dp=kw.get("dp", 1), cfg=kw.get("cfg", 1),
                     dtype=torch.bfloat16, gpu_bytes=None if gpu_gib is None else int(gpu_gib * GiB))


def test_flux_dev_weights_are_counted_from_the_real_config():
    fam = family("flux")
    full, tp2, tp4 = (weight_bytes_per_rank("flux-dev", fam, t, torch.bfloat16) / GiB for t in (1, 2, 4))
    # 11.9 B transformer + 4.8 B T5-XXL + CLIP-L + VAE in bf16.
    assert 31 < full < 32
    # TP splits the transformer's linears (all but the replicated embedder/output layers), nothing else.
    split = 2 * (full - tp2)
    assert 21 < split < 22.3
    assert tp4 == pytest.approx(full - 0.75 * split, rel=1e-3)


def test_big_gpus_get_no_tp_small_ones_the_smallest_degree_that_fits():
    assert _choose("flux-dev", 141, 4) == (1, "")  # H200: Ulysses, measured faster than TP
    assert _choose("flux-dev", None, 4) == (1, "")  # CPU processes: host memory, no TP
    tp, why = _choose("flux-dev", 24, 4)  # 4 × 24 GB cards: 31.4 GiB per rank without TP
    assert tp == 4 and "tp4 chosen" in why and "14.8 GiB" in why
    assert _choose("flux-dev", 32, 4)[0] == 2  # 20.3 GiB ≤ 75% of 32
    # SD3.5-large's 38 heads: TP-4 cannot split them, so 4 ranks offer only TP-2.
    assert _choose("sd3.5-large", 25, 4)[0] == 2
    with pytest.raises(ValueError, match=r"25\.6 GiB per rank without TP; tp2: 18\.1 GiB\)"):
        _choose("sd3.5-large", 24, 4)
    # With cfg 2 on 4 ranks only 2 are left for TP.
    assert _choose("flux-dev", 32, 4, cfg=2)[0] == 2


def test_no_degree_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"31\.4 GiB per rank without TP; tp2: 20\.3 GiB\).*do not fit 75% of one GPU's 24\.0 GiB"):
        _choose("flux-dev", 24, 2)
    with pytest.raises(ValueError, match="with any TP degree over the 1 rank"):
        _choose("flux-dev", 24, 1)


def test_directory_and_preset_counts_agree(tmp_path):
    from engine.models import get_preset

    folder = get_preset("flux-tiny").save(tmp_path / "flux-tiny")
    fam = family("flux")
    for tp in (1, 2):
        assert weight_bytes_per_rank(str(folder), fam, tp, torch.float32) == weight_bytes_per_rank("flux-tiny", fam, tp, torch.float32)
    assert weight_bytes_per_rank(str(folder), fam, 2, torch.float32) < weight_bytes_per_rank(str(folder), fam, 1, torch.float32)


def test_cli_takes_tp_auto():
    from engine.runtime.distributed import UserError
    from engine.generate import build_parser

    assert build_parser().parse_args(["--tp", "auto"]).tp is None
    assert build_parser().parse_args([]).tp is None
    assert build_parser().parse_args(["--tp", "2"]).tp == 2
    with pytest.raises(UserError, match="positive integer"):
        build_parser().parse_args(["--tp", "0"])
