"""Sequence-parallel attention over a mesh: Ulysses inside, Ring across, or either alone.

Legend: B batch, S_r this rank's tokens, S_g tokens of its Ulysses group, H heads, D head dim.

Inputs are this rank's piece of the sequence. `seq_sizes[i]` is the length held by sequence-parallel
rank i (i = ring_coord · U + ulysses_coord); the caller knows them because it made the split. Token
order across ranks does not matter to attention (no mask, no causality): any permutation of the keys
gives the same softmax, which is why Flux's [text, image] pieces can be interleaved across ranks.

Heads that U does not divide, and K/V with fewer heads than Q (grouped-query attention), go through
the general exchange: per-rank head counts from parallel/heads.py, one all-to-all for Q, K and V
(parallel/ulysses.seq_to_heads). Padding: `key_lengths[b]` says that only the first key_lengths[b]
keys of sample b are real — positions in the whole sequence, the concatenation of every rank's piece
in sp order, so it is meant for one token group split contiguously (Lumina2's and Z-Image's streams);
padded keys are never attended (parallel/blocks.py). Padded queries are computed like any other, as
the models' own attention does, and the models drop them.

Block-causal attention (Qwen-Image 2.1, `causal`): positions are whole-sequence ones again, so after
Ulysses' exchange a rank's queries and keys are one contiguous range, and every ring block another;
each block is attended by the rule (parallel/block_causal.py). The prefill can keep this rank's share of
the prefix's K/V (`keep`), which later steps attend before their own keys (`prefix`).

`qkv="fp8"` (the fast path's `--quantize-qkv fp8`): Q, K and V rounded to e4m3 per token and head before
attention on every layout; the Ulysses exchange sends them so, packed with their scales, and so do Ring's
K/V blocks (parallel/qkv_fp8.py); the output's exchange stays in the model's dtype.

Reference tokens that attend each other only (FLUX.2-klein-KV, `references`: where each rank's piece holds
them): after Ulysses' exchange they are a few runs of each block (parallel/references.py); `keep` keeps this
rank's share of their K/V — its heads, of its ring rank's block — which later steps attend as a `prefix`.
"""

from __future__ import annotations

import torch

from shardiff_kernels.registry import choose_kernel

from .block_causal import BlockCausal, PrefixKV, attend_block
from .blocks import attend, valid_counts
from .heads import head_split
from .mesh import Mesh
from .qkv_fp8 import pack, round_trip, unpack
from .references import attend_references, reference_rows
from .ring import ring_attention
from .ulysses import (
    head_to_seq, head_to_seq_finish, head_to_seq_start, heads_to_seq, seq_to_head, seq_to_head_finish, seq_to_head_start,
    seq_to_heads,
)


class ParallelAttention:
    def __init__(self, mesh: Mesh, kernel: str = "auto", *, head_chunks: int = 1, qkv: str = "off"):
        """`head_chunks` > 1 (Ulysses without Ring): the heads go through the all-to-alls and the
        kernel in that many chunks, so the exchange of one chunk overlaps the attention of another
        (chunks that would not give every Ulysses rank whole heads fall back to one chunk).
        `qkv`: "fp8" rounds Q, K and V to e4m3 (and sends them so through Ulysses and Ring), "off" leaves them."""
        if not isinstance(head_chunks, int) or head_chunks < 1:
            raise ValueError(f"head chunks must be a positive integer, got {head_chunks!r}")
        if qkv not in ("off", "fp8"):
            raise ValueError(f"--quantize-qkv must be off or fp8, got {qkv!r}")
        self.mesh = mesh
        self.kernel_name = kernel
        self.head_chunks = head_chunks
        self.fp8 = qkv == "fp8"
        self._kernels: dict[tuple, object] = {}

    def kernel_for(self, device: torch.device, dtype: torch.dtype, need_lse: bool = False):
        need_lse = need_lse or self.mesh.size("ring") > 1
        key = (device.type, dtype, need_lse)
        if key not in self._kernels:
            self._kernels[key] = choose_kernel(self.kernel_name, device, dtype, need_lse=need_lse)
        return self._kernels[key]

    def __call__(
        self,
        q_BSHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        seq_sizes: list[int] | None = None,
        *,
        scale: float | None = None,
        key_lengths: list[int] | None = None,
        causal: BlockCausal | None = None,
        keep: PrefixKV | None = None,
        prefix: PrefixKV | None = None,
        references: tuple[tuple[int, int], ...] | None = None,
    ) -> torch.Tensor:
        """Attention of this rank's queries over the whole sequence's keys, for this rank's tokens.
        K and V may have fewer heads than Q (they must divide its heads).

        `causal`: the block-causal rule over the whole sequence (the concatenation of every rank's piece
        in sp order); `keep`: where this rank keeps its share of the prefix's K/V for later steps;
        `prefix`: attend over that kept prefix before these keys (parallel/block_causal.py).
        `references`: (start, length) of the reference tokens in each sp rank's piece, which attend each
        other only; `keep` then keeps their K/V (parallel/references.py)."""
        mesh = self.mesh
        U, R = mesh.size("ulysses"), mesh.size("ring")
        kernel = self.kernel_for(q_BSHD.device, q_BSHD.dtype, need_lse=causal is not None or references is not None)
        if seq_sizes is None:
            seq_sizes = [q_BSHD.shape[1]] * (U * R)
        assert len(seq_sizes) == U * R and seq_sizes[mesh.coord("sp")] == q_BSHD.shape[1]
        Hq, Hkv = q_BSHD.shape[2], k_BSHD.shape[2]
        assert k_BSHD.shape == v_BSHD.shape and Hq % Hkv == 0, (tuple(q_BSHD.shape), tuple(k_BSHD.shape))
        ring_r = mesh.coord("ring")
        group_sizes = seq_sizes[ring_r * U : (ring_r + 1) * U]
        C = self.head_chunks
        plain = Hkv == Hq and Hq % U == 0
        masked = causal is not None or prefix is not None or references is not None
        assert not masked or (plain and key_lengths is None), "block-causal attention takes whole K/V heads, no padding"
        if U > 1 and R == 1 and C > 1 and plain and key_lengths is None and not masked and Hq % (C * U) == 0:
            return self._chunked_ulysses(q_BSHD, k_BSHD, v_BSHD, group_sizes, kernel, scale)
        heads, dtype = None, q_BSHD.dtype
        # FP8: each exchange sends packed e4m3 rows, unpacked on arrival; without one, the same rounding.
        send = pack if self.fp8 else (lambda t: t)
        arrive = (lambda t: unpack(t, dtype)) if self.fp8 else (lambda t: t)
        if U > 1 and plain:
            # One exchange for Q, K and V together.
            qkv = seq_to_head(send(torch.stack([q_BSHD, k_BSHD, v_BSHD])), mesh.group("ulysses"), group_sizes)
            q_BSHD, k_BSHD, v_BSHD = arrive(qkv).unbind(0)
        elif U > 1:
            split = head_split(Hq, Hkv, U)
            if split.kv_repeat > 1:
                k_BSHD, v_BSHD = (t.repeat_interleave(split.kv_repeat, dim=2) for t in (k_BSHD, v_BSHD))
            q_BSHD, k_BSHD, v_BSHD = (arrive(t) for t in seq_to_heads(
                [send(q_BSHD), send(k_BSHD), send(v_BSHD)], [split.q, split.kv, split.kv], mesh.group("ulysses"),
                group_sizes,
            ))
            heads = split.q
        elif self.fp8:
            q_BSHD, k_BSHD, v_BSHD = (round_trip(t) for t in (q_BSHD, k_BSHD, v_BSHD))
        q_BHSD, k_BHSD, v_BHSD = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        if references is not None:
            out_BHSD = self._references(q_BHSD, k_BHSD, v_BHSD, seq_sizes, kernel, scale, references, keep)
        elif masked:
            out_BHSD = self._block_causal(q_BHSD, k_BHSD, v_BHSD, seq_sizes, kernel, scale, causal, keep, prefix)
        elif R > 1:
            blocks = [sum(seq_sizes[j * U : (j + 1) * U]) for j in range(R)]
            out_BHSD = ring_attention(
                q_BHSD, k_BHSD, v_BHSD, group=mesh.group("ring"), block_sizes=blocks, kernel=kernel, scale=scale,
                key_lengths=key_lengths, fp8=self.fp8,
            )
        else:
            got = attend(kernel, q_BHSD, k_BHSD, v_BHSD, scale=scale,
                         valid=valid_counts(key_lengths, 0, k_BHSD.shape[2]), return_lse=False)
            # No real key for any sample (never from a model: each has text or image tokens): zeros.
            out_BHSD = q_BHSD.new_zeros(q_BHSD.shape) if got is None else got[0]
        out_BSHD = out_BHSD.transpose(1, 2)
        if heads is not None:
            out_BSHD = heads_to_seq(out_BSHD, heads, mesh.group("ulysses"), group_sizes)
        elif U > 1:
            out_BSHD = head_to_seq(out_BSHD, mesh.group("ulysses"), group_sizes)
        return out_BSHD

    def _block_causal(self, q_BHSD, k_BHSD, v_BHSD, seq_sizes, kernel, scale, causal, keep, prefix) -> torch.Tensor:
        """After Ulysses' exchange: this rank's heads of its ring rank's block, a contiguous range of the
        sequence, for queries and keys alike."""
        U, R, r = self.mesh.size("ulysses"), self.mesh.size("ring"), self.mesh.coord("ring")
        blocks = [sum(seq_sizes[j * U : (j + 1) * U]) for j in range(R)]
        starts = [sum(blocks[:j]) for j in range(R)]
        if causal is None:  # a cached step: the target's queries see every key
            k_BHSD, v_BHSD = prefix.extend(k_BHSD, v_BHSD)
            if R == 1:
                return kernel(q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=False)[0]
            blocks = [p + b for p, b in zip(prefix.ring_sizes, blocks)]
            return ring_attention(q_BHSD, k_BHSD, v_BHSD, group=self.mesh.group("ring"), block_sizes=blocks,
                                  kernel=kernel, scale=scale, fp8=self.fp8)
        length = sum(blocks)
        if keep is not None:
            keep.keep(k_BHSD, v_BHSD, [min(max(causal.prefix - s, 0), b) for s, b in zip(starts, blocks)], r)

        def block(q, k, v, j):
            return attend_block(kernel, q, k, v, q_start=starts[r], k_start=starts[j], causal=causal, length=length,
                                scale=scale)

        if R == 1:
            got = block(q_BHSD, k_BHSD, v_BHSD, 0)
            assert got is not None, "every query sees at least itself"
            return got[0].to(q_BHSD.dtype)
        return ring_attention(q_BHSD, k_BHSD, v_BHSD, group=self.mesh.group("ring"), block_sizes=blocks, kernel=kernel,
                              scale=scale, block_attend=block, fp8=self.fp8)

    def _references(self, q_BHSD, k_BHSD, v_BHSD, seq_sizes, kernel, scale, references, keep) -> torch.Tensor:
        """After Ulysses' exchange: this rank's heads of its ring rank's block; the reference queries see the
        reference keys only (parallel/references.py)."""
        U, R, r = self.mesh.size("ulysses"), self.mesh.size("ring"), self.mesh.coord("ring")
        assert len(references) == U * R, (references, U, R)
        rows = [reference_rows(references, seq_sizes, j, U, q_BHSD.device) for j in range(R)]
        if keep is not None:
            keep.keep_rows(k_BHSD, v_BHSD, rows[r], [len(x) for x in rows])

        def block(q, k, v, j):
            return attend_references(kernel, q, k, v, q_rows=rows[r], k_rows=rows[j], scale=scale)

        if R == 1:
            return block(q_BHSD, k_BHSD, v_BHSD, 0)[0].to(q_BHSD.dtype)
        blocks = [sum(seq_sizes[j * U : (j + 1) * U]) for j in range(R)]
        return ring_attention(q_BHSD, k_BHSD, v_BHSD, group=self.mesh.group("ring"), block_sizes=blocks, kernel=kernel,
                              scale=scale, block_attend=block, fp8=self.fp8)

    def _chunked_ulysses(self, q_BSHD, k_BSHD, v_BSHD, group_sizes, kernel, scale) -> torch.Tensor:
        """Ulysses in C head chunks: all input exchanges are launched at once; chunk c's attention
        starts when its own exchange lands (the next ones still in flight), and its output exchange
        is launched before chunk c+1's attention. Each head's result is exactly the unchunked one."""
        group, C, dtype = self.mesh.group("ulysses"), self.head_chunks, q_BSHD.dtype
        qkv_3BSHD = torch.stack([q_BSHD, k_BSHD, v_BSHD])
        Hc = qkv_3BSHD.shape[3] // C
        if self.fp8:  # rows are per head, so packing before the head chunks packs each chunk's rows alike
            qkv_3BSHD = pack(qkv_3BSHD)
        sent = [seq_to_head_start(qkv_3BSHD[:, :, :, c * Hc : (c + 1) * Hc], group, group_sizes) for c in range(C)]
        back = []
        for pending in sent:
            got = seq_to_head_finish(pending)
            q, k, v = (t.transpose(1, 2) for t in (unpack(got, dtype) if self.fp8 else got).unbind(0))
            out_BHSD, _ = kernel(q, k, v, scale=scale, return_lse=False)
            back.append(head_to_seq_start(out_BHSD.transpose(1, 2), group, group_sizes))
        # Chunk c holds heads [c·Hc, (c+1)·Hc) in order, so concatenating restores the head order.
        return torch.cat([head_to_seq_finish(p, group, group_sizes) for p in back], dim=2)
