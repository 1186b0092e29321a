"""The `shapes` model: a tiny FluxPipeline (every component a stock diffusers/transformers class).

- transformer: FluxTransformer2DModel, 2 double-stream + 4 single-stream blocks, 4 heads × 32 (so
  Ulysses 2/4, Ring, their hybrid and TP-2 all apply), no guidance embedding. Rotary axes [4, 14, 14]:
  Flux has no absolute position embedding, so "top left" is only learnable through RoPE (image queries
  against the text keys, which all sit at position 0); 14 dims per axis give it low frequencies to use.
- vae: AutoencoderKL, 4 levels (vae_scale_factor 8), 8 latent channels, fully convolutional; at
  64×64 pixels the transformer sees 4×4 = 16 image tokens (2×2 latent patches of 16×16 pixels) plus the
  512 T5 tokens FluxPipeline pads the prompt to.
- text_encoder: CLIPTextModel (64 wide, 2 layers), trained with the transformer: its pooled output
  conditions every block (AdaLN) and carries the word order.
- text_encoder_2: T5EncoderModel (64 wide, 2 layers), random but fixed (seeded), with its relative
  position bias set to zero. It still gives every word its own embedding (distinct prompts → distinct
  embeddings), and it makes all padding positions identical, which training relies on (below).
- tokenizer / tokenizer_2: engine/presets/tokenizer.py's word-level tokenizer.
- scheduler: FlowMatchEulerDiscreteScheduler without shift (16-token images need none).

Training and FluxPipeline see the same model: FluxPipeline pads the T5 prompt to
`max_sequence_length` (512) tokens and runs the transformer without an attention mask. With a
position-free T5 and Flux's all-zero `txt_ids`, every padding token enters every block with the same
value and stays identical to the others, so m of them act in attention exactly like ONE of them whose
attention logit is raised by log m. `compressed_text` turns a full-length T5 output into
TEXT_SLOTS tokens plus that additive attention bias, which training passes as the attention mask
(diffusers' FluxAttnProcessor forwards it to SDPA): 16 + 16 tokens per image instead of 512 + 16,
exactly the same function (`check_compression` verifies it, and so does tests/test_toy_model.py).
"""

from __future__ import annotations

import math

import torch

from engine.presets import tokenizer as tok
from engine.presets.components import CLIP_L, T5_XXL, TINY_VOCAB, clip_text, t5_encoder
from engine.presets.spec import PresetSpec

IMAGE_SIZE = 64
TEXT_SLOTS = 16  # ≥ the longest caption in T5 tokens (12, with <eos>)
# T5 lengths seen in training (FluxPipeline's default 512 most often), so --max-sequence-length works too.
TRAIN_TEXT_LENGTHS = (64, 77, 128, 256, 512)
TRAIN_TEXT_LENGTH_WEIGHTS = (0.1, 0.1, 0.1, 0.1, 0.6)

TRANSFORMER = dict(
    patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=[4, 14, 14],
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 32], layers_per_block=1, act_fn="silu", latent_channels=8, norm_num_groups=8,
    sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0, force_upcast=False,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
)
CLIP = {**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4}
T5 = {**T5_XXL, "vocab_size": TINY_VOCAB, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4}
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

assert TRANSFORMER["in_channels"] == 4 * VAE["latent_channels"]
assert TRANSFORMER["joint_attention_dim"] == T5["d_model"]
assert TRANSFORMER["pooled_projection_dim"] == CLIP["hidden_size"]
assert sum(TRANSFORMER["axes_dims_rope"]) == TRANSFORMER["attention_head_dim"]


def zero_init_modulation_(transformer) -> None:
    """DiT-style start: every block's gates and the output layer are zero, so the model starts as 0."""
    mods = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        mods += [block.norm1.linear, block.norm1_context.linear]
    for block in transformer.single_transformer_blocks:
        mods += [block.norm.linear]
    for m in mods:
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)


def build_untrained_pipeline(seed: int = 0):
    """The FluxPipeline before training, built on the CPU (same values on every machine for one seed)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER)
    zero_init_modulation_(transformer)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE)
    # Text encoders: the presets' per-parameter init (a pure function of seed and name).
    spec = PresetSpec(name="shapes", family="flux", pipeline_class="FluxPipeline", description="", default_size=IMAGE_SIZE,
                      components={"text_encoder": clip_text(CLIP), "text_encoder_2": t5_encoder(T5)}, tokenizers={},
                      scheduler=("FlowMatchEulerDiscreteScheduler", SCHEDULER))
    clip = spec.build_component("text_encoder", seed=seed, device="cpu", dtype=torch.float32)
    t5 = spec.build_component("text_encoder_2", seed=seed, device="cpu", dtype=torch.float32)
    for layer in t5.encoder.block:
        bias = layer.layer[0].SelfAttention
        if bias.has_relative_attention_bias:
            torch.nn.init.zeros_(bias.relative_attention_bias.weight)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
        tokenizer=tok.make_tokenizer("clip"), text_encoder_2=t5, tokenizer_2=tok.make_tokenizer("t5"),
        transformer=transformer,
    )


def text_token_counts(pipe, prompts: list[str]) -> list[int]:
    """T5 tokens of each prompt before padding (<eos> included)."""
    return [len(ids) for ids in pipe.tokenizer_2(prompts).input_ids]


@torch.no_grad()
def compressed_text(pipe, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPipeline's T5 prompt embeddings, compressed to TEXT_SLOTS tokens + an attention-logit bias.

    Returns (embeds (N, TEXT_SLOTS, D), bias (N, TEXT_SLOTS)): the k real tokens, then the padding
    token repeated in the remaining slots, each with bias log(m / slots_left) so that together they
    weigh as much as the m = max_sequence_length - k padding tokens of the full sequence.
    """
    full = pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=max_sequence_length)
    counts = text_token_counts(pipe, prompts)
    n, _, d = full.shape
    embeds = torch.empty(n, TEXT_SLOTS, d, dtype=full.dtype, device=full.device)
    bias = torch.zeros(n, TEXT_SLOTS, dtype=torch.float32, device=full.device)
    for i, k in enumerate(counts):
        assert k < TEXT_SLOTS and k < max_sequence_length, f"prompt {prompts[i]!r} is too long for the toy model"
        pads = full[i, k:]
        spread = (pads - pads[:1]).abs().max().item()
        assert spread <= 1e-5 * max(1.0, pads.abs().max().item()), f"padding tokens differ ({spread:.2e})"
        embeds[i, :k] = full[i, :k]
        embeds[i, k:] = pads[0]
        bias[i, k:] = math.log((max_sequence_length - k) / (TEXT_SLOTS - k))
    return embeds, bias


def image_ids(pipe, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, device="cpu", dtype=torch.float32):
    """img_ids exactly as FluxPipeline.prepare_latents makes them."""
    lh = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    lw = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    return pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, device, dtype)


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def transformer_forward(pipe, packed: torch.Tensor, sigma: torch.Tensor, pooled: torch.Tensor,
                        text: torch.Tensor, text_bias: torch.Tensor | None, img_ids: torch.Tensor) -> torch.Tensor:
    """The velocity (noise - x0) prediction, called as FluxPipeline calls the transformer.

    `sigma` (B,) is the noise level in [0, 1] (FluxPipeline passes timestep / 1000 = sigma). With a
    `text_bias`, `text` is compressed_text output; without, the full-length T5 embeddings.
    """
    txt_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)
    kwargs = None
    if text_bias is not None:
        n_img = packed.shape[1]
        mask = torch.cat([text_bias, text_bias.new_zeros(text_bias.shape[0], n_img)], dim=1)
        kwargs = {"attention_mask": mask[:, None, None, :].to(packed.dtype)}
    return pipe.transformer(
        hidden_states=packed, timestep=sigma.to(packed.dtype), guidance=None, pooled_projections=pooled,
        encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=kwargs,
        return_dict=False,
    )[0]


@torch.no_grad()
def check_compression(pipe, prompts: list[str], max_sequence_length: int = 512, seed: int = 0) -> float:
    """Relative L2 difference between the compressed-text forward and the full-length one."""
    device = pipe.transformer.device
    g = torch.Generator("cpu").manual_seed(seed)
    n = len(prompts)
    c = pipe.transformer.config.in_channels // 4
    side = IMAGE_SIZE // pipe.vae_scale_factor
    packed = pack(pipe, torch.randn(n, c, side, side, generator=g)).to(device)
    sigma = torch.rand(n, generator=g).to(device)
    pooled = pipe._get_clip_prompt_embeds(prompt=prompts, device=device)
    ids = image_ids(pipe, device=device)
    full = pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=max_sequence_length, device=device)
    ref = transformer_forward(pipe, packed, sigma, pooled, full, None, ids)
    text, bias = compressed_text(pipe, prompts, max_sequence_length)
    out = transformer_forward(pipe, packed, sigma, pooled, text, bias, ids)
    return ((out - ref).double().norm() / ref.double().norm().clamp_min(1e-30)).item()
