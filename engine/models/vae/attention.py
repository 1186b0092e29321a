"""The VAEs' attention under a row split: the KL VAEs' mid-block softmax attention (Ring over the
split tokens) and the DC-AE's EfficientViT linear attention (an all-reduce of its key-value state).

Legend: B batch, C channels, h this rank's rows, W columns, S this rank's tokens (h·W), Hd heads,
D head dim; "kv state" (B, Hd, D+1, D) = Σ over tokens of [v; 1] kᵀ.

Both processors compute exactly what diffusers' own processor computes on the whole image (its
AttnProcessor2_0 / SanaMultiscaleAttnProcessor2_0, line by line), and hand the call to that original
processor when the call is not split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardiff_kernels.registry import available_kernels, get_kernel
from shardiff_parallel.halo import RowContext, RowSplit
from shardiff_parallel.linear_attention import linear_attention
from shardiff_parallel.ring import merge_partial, ring_attention
from shardiff_parallel.sharding import gather_pieces

# The KL VAEs' attention has one head of the full width (512 for every released KL VAE): flash and
# cuDNN kernels stop at head dim 256, mem-efficient SDPA (what F.scaled_dot_product_attention picks
# for it on one GPU) takes any width and returns the log-sum-exp Ring needs.
RING_KERNELS = ("sdpa-efficient", "sdpa-cpu-flash", "math")


def ring_kernel(device: torch.device, dtype: torch.dtype):
    usable = available_kernels(device, dtype=dtype, need_lse=True)
    return get_kernel(next(k for k in RING_KERNELS if k in usable))


def simulated_ring(q_BHSD, k_BHSD, v_BHSD, split: RowSplit, block_sizes: list[int], kernel) -> torch.Tensor:
    """One rank's share of Ring attention, alone: its own K/V block, then zero blocks of the other
    ranks' lengths (the same kernels, merges and buffers; not the image's values)."""
    out, lse = kernel(q_BHSD, k_BHSD, v_BHSD, return_lse=True)
    out = out.float()
    B, H, _, D = k_BHSD.shape
    for step in range(1, split.world):
        src = (split.index - step) % split.world
        kv = k_BHSD.new_zeros((2, B, H, block_sizes[src], D))
        blk_out, blk_lse = kernel(q_BHSD, kv[0], kv[1], return_lse=True)
        out, lse = merge_partial(out, lse, blk_out, blk_lse)
    return out.to(q_BHSD.dtype)


class RowSpatialAttention:
    """diffusers' AttnProcessor2_0 on a VAE's spatial self-attention (4-D input, no text, no mask),
    with the rows split: the projections and the group norm (a stand-in with the whole image's
    statistics) run on this rank's tokens, the attention rings the K/V blocks over the split."""

    def __init__(self, rows: RowContext, original):
        self.rows, self.original = rows, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        split = self.rows.split
        if split is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 4
        residual = hidden_states
        B, C, h, W = hidden_states.shape
        x_BSC = hidden_states.view(B, C, h * W).transpose(1, 2)
        if attn.group_norm is not None:
            x_BSC = attn.group_norm(x_BSC.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(x_BSC), attn.to_k(x_BSC), attn.to_v(x_BSC)
        Hd = attn.heads
        D = k.shape[-1] // Hd
        q_BHSD, k_BHSD, v_BHSD = (t.view(B, -1, Hd, D).transpose(1, 2) for t in (q, k, v))
        kernel = ring_kernel(q.device, q.dtype)
        # Tokens are rows × W in row-major order: each rank's block is its rows.
        blocks = [r * W for r in split.rows(h)]
        if split.simulated:
            out_BHSD = simulated_ring(q_BHSD, k_BHSD, v_BHSD, split, blocks, kernel)
        else:
            # scale None: the kernel's 1/sqrt(D), what AttnProcessor2_0's SDPA call uses.
            out_BHSD = ring_attention(q_BHSD, k_BHSD, v_BHSD, group=split.group, block_sizes=blocks, kernel=kernel)
        out = out_BHSD.transpose(1, 2).reshape(B, -1, Hd * D).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(B, C, h, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def spatial_attention_refusal(attn) -> str | None:
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        return "spatial or query/key norms"
    if attn.is_cross_attention:
        return "cross-attention"
    return None


class RowLinearAttention:
    """diffusers' SanaMultiscaleAttnProcessor2_0 with the rows split: the multiscale depthwise
    convolutions are halo stand-ins; the linear attention's kv state (which sums over all tokens,
    normaliser row included) is all-reduced in fp32, then applied to this rank's queries. Images of
    at most head-dim tokens take diffusers' quadratic form: K and V (that few tokens) are gathered."""

    def __init__(self, rows: RowContext, original):
        self.rows, self.original = rows, original

    def __call__(self, attn, hidden_states):
        split = self.rows.split
        if split is None:
            return self.original(attn, hidden_states)
        B, _, h, W = hidden_states.shape
        sizes = split.rows(h)
        # The whole image's token count decides the form, as on one device.
        use_linear = sum(sizes) * W > attn.attention_head_dim
        residual, original_dtype = hidden_states, hidden_states.dtype
        x = hidden_states.movedim(1, -1)
        x = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=3).movedim(-1, 1)
        x = torch.cat([x, *(block(x) for block in attn.to_qkv_multiscale)], dim=1)
        if use_linear:
            x = x.to(dtype=torch.float32)
        x = x.reshape(B, -1, 3 * attn.attention_head_dim, h * W)
        q, k, v = x.chunk(3, dim=2)
        q, k = attn.nonlinearity(q), attn.nonlinearity(k)
        if use_linear:
            # The kv state summed over the whole image (parallel/linear_attention.py), applied to this rank's queries.
            out = linear_attention(q, k, v, eps=attn.eps, group=None if split.simulated else split.group)
            out = out.to(dtype=original_dtype)
        else:
            tokens = [r * W for r in sizes]
            if split.simulated:
                k_all = F.pad(k, (0, sum(tokens) - k.shape[-1]))
                v_all = F.pad(v, (0, sum(tokens) - v.shape[-1]))
            else:
                k_all, v_all = (gather_pieces(t.contiguous(), 3, tokens, split.group) for t in (k, v))
            out = attn.apply_quadratic_attention(q, k_all, v_all)
        out = torch.reshape(out, (B, -1, h, W))
        out = attn.to_out(out.movedim(1, -1)).movedim(-1, 1)
        if attn.norm_type == "rms_norm":
            out = attn.norm_out(out.movedim(1, -1)).movedim(-1, 1)
        else:
            out = attn.norm_out(out)
        if attn.residual_connection:
            out = out + residual
        return out
