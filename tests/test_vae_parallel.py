"""The VAE decode and encode split by rows over 2, 3 and 4 gloo ranks equal the single-process
untiled result (fp32, ≤ 1e-5 of the largest value: a seam would show as a local error, which a
relative L2 could average away), for the tiny KL VAE (mid-block attention, Ring over the rows), the
FLUX.2 KL VAE class and the tiny DC-AE (linear attention, 5×5 multiscale convolutions).

Sizes are chosen so that the latent rows do not divide the ranks (uneven pieces), pieces of a single
latent row occur (a 5×5 halo then spans two ranks), and one DC-AE image is small enough for
diffusers' quadratic attention form. GroupNorm statistics are checked against float64 on fp32 data whose
mean dwarfs its spread (where E[x²] − E[x]² in fp32 would lose every digit).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

# (vae, latent rows, latent cols); encode runs on the image of the same latent size.
DECODE_CASES = [("kl", 7, 5), ("kl", 5, 6), ("flux2", 7, 3), ("dc", 5, 3), ("dc", 4, 1)]
ENCODE_CASES = [("kl", 7, 5), ("dc", 5, 3)]


def _tiny_vae(kind: str):
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2

    from engine.presets.components import FLUX_VAE, TINY_DC_AE, TINY_KL

    torch.manual_seed(0)  # the same weights in every process
    if kind == "dc":
        vae = AutoencoderDC(**TINY_DC_AE)
    elif kind == "flux2":
        vae = AutoencoderKLFlux2(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8,
                                 latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                                 up_block_types=["UpDecoderBlock2D"] * 4)
    else:
        vae = AutoencoderKL(**{**FLUX_VAE, **TINY_KL, "latent_channels": 4})
    with torch.no_grad():  # norms away from the identity, so their affine parts count
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


def _scale(kind: str) -> int:
    return 4 if kind == "dc" else 8


def _latent(kind, h, w, vae):
    channels = vae.config.latent_channels
    return torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(h * 100 + w))


def _image(h, w, scale):
    return torch.rand(1, 3, h * scale, w * scale, generator=torch.Generator().manual_seed(h + w)) * 2 - 1


def _encode(vae, x):
    out = vae.encode(x)
    return out.latent if hasattr(out, "latent") else out.latent_dist.mean  # DC-AE / KL


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _split_all():
    import torch.distributed as dist

    from engine.models.vae import vae_plan
    from shardiff_parallel.vae import apply_vae_plan

    world = dist.get_world_size()
    out = {}
    with torch.no_grad():
        for kind in ("kl", "flux2", "dc"):
            vae = _tiny_vae(kind)
            calls = [("decode", h, w, _latent(kind, h, w, vae)) for k, h, w in DECODE_CASES if k == kind]
            calls += [("encode", h, w, _image(h, w, _scale(kind))) for k, h, w in ENCODE_CASES if k == kind]
            run = {"decode": lambda x: vae.decode(x).sample, "encode": lambda x: _encode(vae, x)}
            whole = [run[op](x) for op, _, _, x in calls]
            applied = apply_vae_plan(vae, vae_plan(type(vae).__name__), group=dist.group.WORLD)
            for (op, h, w, x), ref in zip(calls, whole):
                if h < world:
                    continue
                got = run[op](x)
                out[(kind, op, h, w)] = (_max_rel(got, ref), applied.last[op], tuple(got.shape) == tuple(ref.shape))
            applied.remove()
            # Removed: the VAE is diffusers' own again, bit for bit.
            out[(kind, "removed")] = all(torch.equal(run[op](x), ref) for (op, _, _, x), ref in zip(calls, whole))
    out["group_norm"] = _group_norm_case(world)
    if world == 4:
        out["mesh"] = _mesh_case()
    return out


def _group_norm_case(world: int):
    import torch.distributed as dist
    import torch.nn.functional as F

    from shardiff_parallel.group_norm import RowGroupNorm, global_moments
    from shardiff_parallel.halo import RowContext, RowSplit, take_rows
    from shardiff_parallel.sharding import split_sizes

    g = torch.Generator().manual_seed(3)
    x = 1000.0 + torch.randn(2, 8, 11, 5, generator=g)  # large mean, unit spread
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
    split = RowSplit(tuple(split_sizes(11, world)), dist.get_rank(), dist.group.WORLD)
    local = take_rows(x, split, 1)
    mean, var = global_moments(local.reshape(2, 4, -1), split)
    truth = x.double().reshape(2, 4, -1)
    stats_err = max(((mean - truth.mean(-1)).abs() / truth.std(-1)).max().item(),
                    ((var - truth.var(-1, correction=0)) / truth.var(-1, correction=0)).abs().max().item())
    rows = RowContext()
    rows.split = split
    with torch.no_grad():
        got = RowGroupNorm(norm, rows)(local)
        truth_out = take_rows(F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6), split, 1)
        one_device = take_rows(F.group_norm(x, 4, norm.weight, norm.bias, 1e-6), split, 1)
    # At 1000 ± 1, fp32 itself holds x − mean to ~1e-5: the split must be as close to float64 as one device is.
    return stats_err, _max_rel(got.double(), truth_out) / max(_max_rel(one_device.double(), truth_out), 1e-7)


def _mesh_case():
    import torch.distributed as dist

    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh

    out = {}
    for cfg in (ParallelConfig(dp=2, ulysses=2), ParallelConfig(cfg=2, ring=2), ParallelConfig(dp=4)):
        mesh = Mesh.build(cfg, torch.device("cpu"))
        g = mesh.group("image")
        out[cfg.describe()] = (mesh.size("image"), mesh.coord("image"),
                               None if g is None else dist.get_process_group_ranks(g), g is mesh.group("ulysses"))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_split_vae_equals_whole(world):
    results = run_distributed(_split_all, world, timeout=240)
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key == "group_norm":
                stats_err, norm_err = value
                # fp32 data at 1000 ± 1 carries ~1e-5 of its spread; E[x²] − E[x]² would be off by ~1e-2.
                assert stats_err <= 1e-4, f"rank {rank}: GroupNorm statistics off by {stats_err:.1e}"
                assert norm_err <= 2, f"rank {rank}: split GroupNorm {norm_err:.1f}× further from float64 than one device"
            elif key == "mesh":
                me = rank
                assert value["dp2×ulysses2"] == (2, me % 2, [me - me % 2, me - me % 2 + 1], True)
                assert value["cfg2×ring2"][:3] == (4, me, [0, 1, 2, 3])
                assert value["dp4"] == (1, 0, None, True)  # no group: the decode stays whole
            elif key[1] == "removed":
                assert value, f"rank {rank}: {key[0]} VAE differs from diffusers' after remove()"
            else:
                err, ranks, same_shape = value
                assert same_shape and ranks == world, f"rank {rank} {key}: ran over {ranks} ranks"
                assert err <= 1e-5, f"rank {rank} {key}: split differs from whole by {err:.1e} (max, relative)"
    assert len([k for k in results[0] if isinstance(k, tuple) and len(k) == 4]) >= 5


def test_bad_flag_values_are_clear_errors():
    from engine.config import EngineConfig
    from engine.generate import build_parser
    from engine.runtime.distributed import UserError

    with pytest.raises(ValueError, match="--vae-parallel must be auto, on or off, got 'yes'"):
        EngineConfig(vae_parallel="yes")
    with pytest.raises(UserError, match="--vae-parallel: invalid choice: 'maybe'"):
        build_parser().parse_args(["--vae-parallel", "maybe"])


def test_on_is_refused_for_a_vae_without_a_plan(monkeypatch):
    import engine.models.vae as vae_models
    from engine import vae_parallel
    from engine.config import EngineConfig

    vae_parallel.preflight(EngineConfig(model="flux-tiny", vae_parallel="on"))  # AutoencoderKL: planned
    monkeypatch.delitem(vae_models.VAE_PLANS, "AutoencoderKL")
    with pytest.raises(ValueError, match=r"--vae-parallel on: the VAE of flux-tiny \(AutoencoderKL\) has no row-split plan"):
        vae_parallel.preflight(EngineConfig(model="flux-tiny", vae_parallel="on"))
    vae_parallel.preflight(EngineConfig(model="flux-tiny", vae_parallel="auto"))  # auto: stays whole, no error


def test_auto_rule():
    from engine.models.vae import AUTO_DEFAULT_MIN_PIXELS, auto_splits

    side = int(AUTO_DEFAULT_MIN_PIXELS**0.5)
    assert auto_splits(side, side, 2) and not auto_splits(side // 2, side, 4) and not auto_splits(side, side, 1)


def test_bench_runs_on_cpu(tmp_path):
    """engine.bench.vae at a tiny size: diffusers, tiled and one simulated share (one rank's piece alone)."""
    import json

    from engine.bench.vae import main

    out = tmp_path / "vae.json"
    main(["--vae", "tiny", "--sizes", "48", "--dtypes", "fp32", "--device", "cpu", "--shares", "3", "--repeats", "1",
          "--json", str(out)])
    records = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"diffusers", "tiled", "share-3"}
    assert records["share-3"]["split_over"] == 3 and records["share-3"]["out_rows"] == 16  # 6 latent rows / 3, × 8
    assert records["tiled"]["rel_l2_vs_whole"] > 1e-3  # diffusers' tiles blend: not the whole decode
