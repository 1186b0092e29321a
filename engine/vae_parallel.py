"""`--vae-parallel`: the pipeline's own `vae.decode` / `vae.encode` split by rows over the ranks of one image.

The engine installs the VAE's row-split plan (engine/models/vae, applied by parallel/vae.py) on the
pipeline's VAE instance: stand-in modules, processors and encoder / decoder hooks, removed again by
`Engine.close` (and moved when the layout changes, engine/data_parallel.py). The pipeline is not
touched: its decode call runs split and every rank gets the whole image back — the pipelines
post-process on every rank, and the image is a few MB against the activations it replaces.

The group is the mesh's "image" axis (cfg × ring × ulysses × tp: the ranks that hold the same
latents); dp ranks draw other images and decode them apart. `on` splits every decode that gives each
rank at least one latent row (smaller images are refused up front); `auto` splits from the sizes of
`engine.models.vae.auto_splits`; `off` never.
"""

from __future__ import annotations

from shardiff_parallel.vae import apply_vae_plan

from engine.loading.inspect import component_class
from engine.models.vae import auto_splits, vae_plan


def preflight(config, model=None) -> None:
    """ValueError (before any collective) where `on` cannot hold: the VAE class has no row-split plan.
    `model`: config.model's description (engine/loading/model.py), where the caller has it."""
    if config.vae_parallel != "on":
        return
    cls = component_class(model or config.model, "vae")
    if cls is None or vae_plan(cls) is None:
        from engine.models.vae import VAE_PLANS

        raise ValueError(f"--vae-parallel on: the VAE of {config.model} ({cls}) has no row-split plan (planned: "
                         f"{', '.join(sorted(VAE_PLANS))}); use --vae-parallel auto or off")


def install(engine):
    """The applied plan on `engine`'s VAE over its current mesh, or None (off, one rank, no plan).

    A VAE whose instance the plan does not cover raises ValueError under `on` (all ranks alike:
    same model, same check); under `auto` it stays whole.
    """
    mode, vae = engine.config.vae_parallel, getattr(engine.pipe, "vae", None)
    ranks = engine.mesh.size("image")
    if mode == "off" or ranks == 1 or vae is None:
        return None
    plan = vae_plan(type(vae).__name__)
    if plan is None:
        return None
    when = (lambda h, w, n: True) if mode == "on" else auto_splits
    try:
        return apply_vae_plan(vae, plan, group=engine.mesh.group("image"), when=when)
    except ValueError:
        if mode == "on":
            raise
        return None


def check_vae_rows(mode: str, info, image_ranks: int, height: int) -> None:
    """ValueError for an `on` request whose latent rows cannot give every rank one (pure: the
    request check of engine/request_check.py calls it)."""
    if mode != "on" or image_ranks == 1:
        return
    rows = height // info.vae_scale_factor
    if rows < image_ranks:
        need = image_ranks * info.vae_scale_factor
        raise ValueError(
            f"--vae-parallel on splits the VAE's {rows} latent rows ({height} px / {info.vae_scale_factor}) over "
            f"{image_ranks} ranks, one row each at least: use --height ≥ {need}, or --vae-parallel auto"
        )


def describe(engine, image_ranks: int, height: int, width: int) -> str:
    """What the decode of a height × width image will do over `image_ranks` ranks, for the layout line."""
    mode, vae = engine.config.vae_parallel, getattr(engine.pipe, "vae", None)
    if image_ranks == 1 or vae is None:
        return "VAE whole (one rank per image)"
    if mode == "off":
        return "VAE whole on every rank (--vae-parallel off)"
    if vae_plan(type(vae).__name__) is None:
        return f"VAE whole on every rank (no row-split plan for {type(vae).__name__})"
    if mode == "on" or auto_splits(height, width, image_ranks):
        return f"VAE split by rows over {image_ranks} ranks"
    return f"VAE whole on every rank (auto: {width}x{height} is below the split size for {image_ranks} ranks)"
