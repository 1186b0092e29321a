"""Train the `shapes` model from nothing: `python -m engine.toy.train --out DIR`.

Stages (each logs to stdout):
  1. VAE: a tiny AutoencoderKL learns to reconstruct procedural images (engine.toy.data), first on
     32×32 crops around the shape, then on whole 64×64 images.
  2. Latents: a fixed set of captioned images is encoded once; the latents' mean and standard deviation
     become the VAE's shift_factor and scaling_factor (as FluxPipeline un-scales before decoding).
  3. Text: FluxPipeline's own T5 prompt embeddings of every caption, compressed (engine.toy.model).
  4. Transformer + CLIP: rectified flow as FluxPipeline samples it: x_t = (1 - t)·x0 + t·noise, the
     transformer predicts noise - x0 from packed 2×2 latent patches, img_ids and txt_ids as FluxPipeline
     makes them, CLIP's pooled output trained along.
  5. DIR is written with FluxPipeline.save_pretrained (safetensors, float16 weights), reloaded through
     engine.loading, and a few prompts are drawn and checked with engine.toy.data.check_image.

Deterministic: everything follows --seed (numpy/torch generators on the CPU), so two runs on the same
kind of CPU with the same --threads write identical files; the CUDA path gets the same data and noise
but other float rounding. The shipped weights in engine/assets/shapes are this script's output on a
CPU (2 threads) with the default arguments:

    OMP_WAIT_POLICY=PASSIVE python -m engine.toy.train --out engine/assets/shapes --overwrite

That run took 24 minutes on 2 CPU cores that other processes were using too (VAE 5 min, latents and
text 2 min, 2500 transformer steps of 64 images 17 min at 0.40-0.52 s/step); final loss 0.080 (mean
of the last 100 steps), and its closing check drew 31 of 32 prompts right. On one H200
(`--device cuda`, the default when a GPU is visible) the same run takes 108 s (VAE 27 s, latents and
text 11 s, 2500 steps at 0.03 s/step) and its weights also pass 31 of 32.

OMP_WAIT_POLICY=PASSIVE matters on a shared CPU: without it, OpenMP threads spin while they wait and a
step can take 10× longer when other processes compete for the cores (it must be set before Python starts;
the result does not depend on it).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.toy import data
from engine.toy import model as toy


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- stage 1: VAE

def _crops(images: torch.Tensor, scenes: list[data.Scene], size: int, rng: np.random.Generator) -> torch.Tensor:
    """size×size crops that usually contain (part of) the shape."""
    side = images.shape[-1]
    out = []
    for img, sc in zip(images, scenes):
        top = int(np.clip(round(sc.cy) - size // 2 + rng.integers(-size // 3, size // 3 + 1), 0, side - size))
        left = int(np.clip(round(sc.cx) - size // 2 + rng.integers(-size // 3, size // 3 + 1), 0, side - size))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def train_vae(vae, args, device) -> None:
    rng = np.random.default_rng(args.seed + 100)
    gen = torch.Generator("cpu").manual_seed(args.seed + 100)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = args.vae_steps + args.vae_full_steps
    start, running = time.perf_counter(), []
    for step in range(total):
        full = step >= args.vae_steps
        batch = args.vae_batch // 2 if full else args.vae_batch
        scenes = data.sample_scenes(rng, batch)
        images = data.render(scenes)
        if not full:
            images = _crops(images, scenes, data.IMAGE_SIZE // 2, rng)
        x = data.to_model_range(images).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.vae_lr, 50)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append(rec_loss.item())
        if (step + 1) % 100 == 0 or step + 1 == total:
            log(f"vae step {step + 1}/{total} ({'64x64' if full else '32x32 crops'}) recon {np.mean(running):.4f} "
                f"kl {kl.item():.3f} ({time.perf_counter() - start:.0f} s)")
            running = []
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    out = [vae.encode(data.to_model_range(images[i:i + batch]).to(device)).latent_dist.mode().float().cpu()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def vae_report(vae, device, seed: int) -> None:
    scenes = data.sample_scenes(np.random.default_rng(seed + 300), 64)
    images = data.render(scenes)
    x = data.to_model_range(images).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    err = (rec - x).abs().mean().item() * 127.5
    rec_u8 = ((rec + 1) * 127.5).round().byte().cpu()
    ok = sum(not data.check_image(r.permute(1, 2, 0).numpy(), s.caption) for r, s in zip(rec_u8, scenes))
    log(f"vae: mean abs error {err:.1f}/255 on 64 new images; {ok}/64 reconstructions pass check_image")


# ---------------------------------------------------------------- stage 3-4: transformer

def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Mostly logit-normal (SD3), a fifth uniform so that the ends of [0, 1] are trained too."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.2, uniform, logit_normal)


@torch.no_grad()
def quick_eval(pipe, prompts: list[str], device, steps: int = 20, seed: int = 0) -> int:
    """How many prompts pass check_image, sampled as FluxPipeline samples (Euler on the same sigmas),
    with the compressed 512-token text. For progress reports during training only."""
    pipe.transformer.eval()
    n = len(prompts)
    c = pipe.transformer.config.in_channels // 4
    side = data.IMAGE_SIZE // pipe.vae_scale_factor
    x = toy.pack(pipe, torch.randn(n, c, side, side, generator=torch.Generator("cpu").manual_seed(seed))).to(device)
    pooled = pipe._get_clip_prompt_embeds(prompt=prompts, device=device)
    text, bias = toy.compressed_text(pipe, prompts, 512)
    ids = toy.image_ids(pipe, device=device)
    sigmas = np.append(np.linspace(1.0, 1 / steps, steps), 0.0)
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((n,), float(s0), device=device)
        x = x + (s1 - s0) * toy.transformer_forward(pipe, x, sigma, pooled, text.to(device), bias.to(device), ids)
    lat = pipe._unpack_latents(x, data.IMAGE_SIZE, data.IMAGE_SIZE, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    images = ((pipe.vae.decode(lat).sample.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    pipe.transformer.train()
    return sum(not data.check_image(im.permute(1, 2, 0).numpy(), p) for im, p in zip(images, prompts))


def train_transformer(pipe, latents, caption_idx, captions, args, device) -> float:
    """Flow-matching training of the transformer and CLIP; returns the loss of the last 100 steps."""
    # Text: T5 embeddings of every caption at each training length, compressed (exact; see toy.model).
    texts, biases = [], []
    for length in toy.TRAIN_TEXT_LENGTHS:
        parts = [toy.compressed_text(pipe, captions[i:i + 256], length) for i in range(0, len(captions), 256)]
        texts.append(torch.cat([p[0] for p in parts]).cpu())
        biases.append(torch.cat([p[1] for p in parts]).cpu())
    texts, biases = torch.stack(texts), torch.stack(biases)  # (lengths, captions, slots, D), (lengths, captions, slots)
    log(f"text: {len(captions)} captions x {len(toy.TRAIN_TEXT_LENGTHS)} lengths")

    rng = np.random.default_rng(args.seed + 400)
    gen = torch.Generator("cpu").manual_seed(args.seed + 400)
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    pipe.transformer.train().requires_grad_(True)
    pipe.text_encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ids = toy.image_ids(pipe, device=device)
    weights = np.array(toy.TRAIN_TEXT_LENGTH_WEIGHTS) / sum(toy.TRAIN_TEXT_LENGTH_WEIGHTS)
    every = data.all_captions()
    eval_prompts = [every[i] for i in np.random.default_rng(args.seed + 600).choice(len(every), 24, replace=False)]
    start, running, tail = time.perf_counter(), [], []
    for step in range(args.steps):
        idx = rng.integers(len(latents), size=args.batch)
        which = rng.choice(len(toy.TRAIN_TEXT_LENGTHS), size=args.batch, p=weights)
        cap = caption_idx[idx]
        x0 = toy.pack(pipe, latents[idx]).to(device)
        text = texts[which, cap].to(device)
        bias = biases[which, cap].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = sample_sigmas(args.batch, gen).to(device)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        pooled = pipe._get_clip_prompt_embeds(prompt=[captions[c] for c in cap], device=device)
        pred = toy.transformer_forward(pipe, xt, sigma, pooled, text, bias, ids)
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        tail = (tail + [loss.item()])[-100:]
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            el = time.perf_counter() - start
            log(f"step {step + 1}/{args.steps} loss {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({el:.0f} s, {el / (step + 1):.2f} s/step)")
            running = []
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            passed = quick_eval(pipe, eval_prompts, device)
            log(f"step {step + 1}: {passed}/{len(eval_prompts)} quick samples pass check_image")
    pipe.transformer.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    err = toy.check_compression(pipe, captions[:4])
    log(f"trained model: compressed forward vs full 512-token forward: rel L2 {err:.1e}")
    assert err < 1e-4
    return float(np.mean(tail))


# ---------------------------------------------------------------- stage 5: save and check

REPORT_PROMPTS = [
    "a red circle top left on a white background",
    "a blue square bottom right on a yellow background",
    "a green triangle top right on a black background",
    "a yellow circle bottom left on a blue background",
    "a large purple square in the center on a white background",
    "a small orange triangle bottom right on a gray background",
    "a white circle top right on a green background",
    "a black square bottom left on a yellow background",
]


@torch.no_grad()
def report(out: Path, steps: int, n_random: int, seed: int) -> None:
    from engine.loading import load_pipeline

    pipe = load_pipeline(str(out), dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed + 500)
    every = data.all_captions()
    prompts = REPORT_PROMPTS + [every[i] for i in rng.choice(len(every), size=n_random, replace=False)]
    passed = 0
    for i, prompt in enumerate(prompts):
        image = pipe(prompt=prompt, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE, num_inference_steps=steps,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        problems = data.check_image((image * 255).round().astype(np.uint8), prompt)
        passed += not problems
        if i < len(REPORT_PROMPTS) or problems:
            log(f"  {'ok  ' if not problems else 'FAIL'} {prompt}{': ' + '; '.join(problems) if problems else ''}")
    log(f"check_image: {passed}/{len(prompts)} prompts pass ({steps} steps, seed 0)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.toy.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="diffusers directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1000, help="VAE steps on 32x32 crops")
    p.add_argument("--vae-full-steps", type=int, default=300, help="VAE steps on whole 64x64 images")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-3, help="weight of the (per-element mean) KL term")
    p.add_argument("--vae-from", default=None, help="skip stage 1: take the VAE of an earlier output directory "
                   "(for experiments with the later stages; stage 1 is deterministic)")
    p.add_argument("--dataset", type=int, default=24000, help="captioned images encoded for the transformer")
    p.add_argument("--steps", type=int, default=2500, help="transformer steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250, help="quick sample check every N steps (0: never)")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--report-steps", type=int, default=20, help="sampling steps of the final check")
    p.add_argument("--report-random", type=int, default=24, help="random captions in the final check")
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (use --overwrite)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log(f"device {device}, {torch.get_num_threads()} CPU threads, seed {args.seed}")
    if device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log("hint: start with OMP_WAIT_POLICY=PASSIVE on a shared CPU (spinning threads slow training down)")
    t0 = time.perf_counter()

    pipe = toy.build_untrained_pipeline(args.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae", torch_dtype=torch.float32,
                                            use_safetensors=True, local_files_only=True)
        pipe.vae.load_state_dict(vae.state_dict())
        pipe.vae.eval().requires_grad_(False)
        log(f"vae: weights taken from {args.vae_from} (stage 1 skipped)")
    else:
        train_vae(pipe.vae, args, device)
    vae_report(pipe.vae, device, args.seed)

    scenes = data.sample_scenes(np.random.default_rng(args.seed + 200), args.dataset)
    raw = encode(pipe.vae, data.render_chunked(scenes), device)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    log(f"latents: {tuple(latents.shape)}, shift_factor {shift:.4f}, scaling_factor {scale:.4f} "
        f"({time.perf_counter() - t0:.0f} s so far)")

    captions = sorted({s.caption for s in scenes})
    lookup = {c: i for i, c in enumerate(captions)}
    caption_idx = np.array([lookup[s.caption] for s in scenes])
    final_loss = train_transformer(pipe, latents, caption_idx, captions, args, device)
    train_s = time.perf_counter() - t0
    log(f"training done in {train_s:.0f} s; final loss (mean of the last 100 steps) {final_loss:.4f}")

    if out.exists():
        shutil.rmtree(out)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # casting to float16 on a CPU warns; it is only stored
    pipe.to("cpu", getattr(torch, args.save_dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    diffusers.utils.logging.set_verbosity_warning()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 2**20:.1f} MiB)")
    report(out, args.report_steps, args.report_random, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
