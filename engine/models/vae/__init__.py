"""The VAEs' row-split plans, as data, and the rule that says when `--vae-parallel auto` splits.

The VAEs are components that several families share (engine/presets/components.py declares their
configs once), so their plans live here once, keyed by diffusers class, beside the processors they
name (attention.py); the mechanism that applies them is model-agnostic (parallel/vae.py, halo.py,
group_norm.py). Each plan was written from the class's forward code: every module class listed as
row-local was read and found to mix nothing across rows (pointwise or channel-wise, nearest
up-sampling and pixel (un)shuffle of whole rows, which keep ownership aligned because the split is in
blocks of the downsampling factor); the functional padding some modules do before a convolution is
declared in `pre_padded`; anything else in a VAE is refused when the plan is applied.

- AutoencoderKL (FLUX.1, SD3, PixArt, SD1.5, SDXL) and AutoencoderKLFlux2 (the same Encoder / Decoder;
  its latent batch norm runs in the pipeline, outside them): convolutions with halos, GroupNorm with
  the whole image's statistics, the mid-block attention (one head) as Ring attention. Downsample2D
  pads one zero row below before its padding-0, stride-2 convolution. quant_conv / post_quant_conv
  are 1×1 and run whole, outside the split.
- AutoencoderDC (Sana): convolutions (the multiscale depthwise 5×5 too), RMSNorm over channels, its
  EfficientViT linear attention with the key-value state all-reduced, nearest-interpolate or pixel
  (un)shuffle up / down blocks.
- Not planned: AutoencoderKLQwenImage (and the Wan-style video VAEs): its causal 3-D convolutions pad
  through F.pad in their own forward (declarable as `pre_padded`, on dim -2 of 5-D tensors, which the
  halo code would have to take), its down-sampling pads with nn.ZeroPad2d inside an nn.Sequential (a
  module, but one that pads both edges of every piece), its attention block calls SDPA directly (no
  processor to set: it would need a stand-in module), and its per-frame feature caches hold row
  pieces across chunks. Until then it runs whole (auto) or is refused (on).
"""

from __future__ import annotations

from shardiff_parallel.vae import VaePlan

from .attention import RowLinearAttention, RowSpatialAttention, spatial_attention_refusal


def _kl_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _resnet_refusal(m) -> str | None:
    return "up/down-sampling inside the block" if m.upsample is not None or m.downsample is not None else None


def _upsample_refusal(m) -> str | None:
    if m.use_conv_transpose or not m.interpolate or m.norm is not None:
        return "transposed convolution, no interpolation, or a norm"
    return None


def _downsample_refusal(m) -> str | None:
    return "no convolution (pooling) or a norm" if not m.use_conv or m.norm is not None else None


KL_PLAN = VaePlan(
    factor=_kl_factor,
    attention={"Attention": RowSpatialAttention},
    pre_padded={"Downsample2D": lambda m: {"conv": (0, 1)} if m.use_conv and m.padding == 0 else {}},
    row_local=frozenset({"Encoder", "Decoder", "DownEncoderBlock2D", "UpDecoderBlock2D", "UNetMidBlock2D",
                         "ResnetBlock2D", "Upsample2D"}),
    checks={"Attention": spatial_attention_refusal, "ResnetBlock2D": _resnet_refusal, "Upsample2D": _upsample_refusal,
            "Downsample2D": _downsample_refusal},
)


def _dc_factor(vae) -> int:
    return vae.spatial_compression_ratio


DC_PLAN = VaePlan(
    factor=_dc_factor,
    attention={"SanaMultiscaleLinearAttention": RowLinearAttention},
    row_local=frozenset({"Encoder", "Decoder", "ResBlock", "EfficientViTBlock", "SanaMultiscaleAttentionProjection",
                         "GLUMBConv", "RMSNorm", "DCUpBlock2d", "DCDownBlock2d", "BatchNorm2d", "ReLU6"}),
    checks={
        "DCUpBlock2d": lambda m: None if not m.interpolate or m.interpolation_mode == "nearest"
        else f"{m.interpolation_mode} interpolation",
        # In inference form a batch norm is a per-channel affine map; training form mixes the batch.
        "BatchNorm2d": lambda m: "training mode (batch statistics)" if m.training else None,
    },
)

VAE_PLANS: dict[str, VaePlan] = {
    "AutoencoderKL": KL_PLAN,
    "AutoencoderKLFlux2": KL_PLAN,
    "AutoencoderDC": DC_PLAN,
}


def vae_plan(vae_class: str) -> VaePlan | None:
    return VAE_PLANS.get(vae_class)


# ---------------------------------------------------------------- when `auto` splits

AUTO_MIN_PIXELS: dict[int, int] = {}
"""Ranks sharing the image → the smallest image (height × width, pixels) whose decode `auto` splits.
Empty until measured on GPUs (engine/bench/vae.py): every rank count then takes the default."""
AUTO_DEFAULT_MIN_PIXELS = 2048 * 2048
"""Conservative until measured: from 2048² up, where one rank's whole decode is the largest
activation of the request; below, the whole decode on every rank stays (today's behaviour)."""


def auto_splits(height: int, width: int, ranks: int) -> bool:
    return ranks > 1 and height * width >= AUTO_MIN_PIXELS.get(ranks, AUTO_DEFAULT_MIN_PIXELS)
