"""Reference tokens that attend each other only (FLUX.2-klein-KV's first step), over pieces of one sequence.

Legend: B batch, H heads, Sq queries of this rank, Sk keys of one block, D head dim.

diffusers' rule (`_flux2_kv_causal_attention`, extract mode): the reference tokens' queries see the
reference keys alone; every other query (text, the target image) sees every key, references included. The
references' keys and values do not change from step to step, so later steps attend the kept ones instead
of recomputing them (parallel/block_causal.py's `PrefixKV`).

Where they sit. Each sequence-parallel rank's piece holds a run of reference tokens (`spans[i]`: its start
in sp rank i's piece and its length, perhaps 0). After Ulysses' exchange a rank holds its heads of the
pieces of its Ulysses group, concatenated in rank order (ring rank j's block: sp ranks jU … jU + U - 1), so
the references of a block are U runs (`reference_rows`). `attend_references` computes the exact softmax
partial — output and log-sum-exp — of this rank's queries over one block: every query but the references
over all its keys, the reference queries over its reference keys. Partials merge by their log-sum-exps, so
Ulysses (one block: the whole sequence) and Ring (each ring rank's block in turn, parallel/ring.py) give the
single-process result; a reference query always sees itself, so its merged lse is finite.
"""

from __future__ import annotations

import torch


def reference_rows(spans, seq_sizes: list[int], ring_rank: int, ulysses: int, device) -> torch.Tensor:
    """Positions of the reference tokens in ring rank `ring_rank`'s block after Ulysses' exchange: the
    concatenation of the pieces of sp ranks ring_rank·U … ring_rank·U + U - 1."""
    rows, offset = [], 0
    for i in range(ring_rank * ulysses, (ring_rank + 1) * ulysses):
        start, count = spans[i]
        assert 0 <= start and start + count <= seq_sizes[i], (spans, seq_sizes)
        rows.append(torch.arange(offset + start, offset + start + count, device=device))
        offset += seq_sizes[i]
    return torch.cat(rows)


def attend_references(kernel, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, *,
                      q_rows: torch.Tensor, k_rows: torch.Tensor, scale: float | None):
    """(out float32, lse) of the queries over one block of keys: those at `q_rows` (references) over the keys at
    `k_rows` (the block's references) only, the others over every key of the block. A reference query with no
    reference key in the block gets zeros and lse -inf (the merge leaves it to the other blocks)."""
    B, H, Sq, D = q_BHSD.shape
    if q_rows.numel() == 0:
        out, lse = kernel(q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=True)
        return out.float(), lse
    out = torch.zeros(B, H, Sq, D, dtype=torch.float32, device=q_BHSD.device)
    lse = torch.full((B, H, Sq), float("-inf"), device=q_BHSD.device)
    others = torch.ones(Sq, dtype=torch.bool, device=q_BHSD.device)
    others[q_rows] = False
    others = others.nonzero().squeeze(1)
    if others.numel():
        o, m = kernel(q_BHSD.index_select(2, others), k_BHSD, v_BHSD, scale=scale, return_lse=True)
        out.index_copy_(2, others, o.float())
        lse.index_copy_(2, others, m.float())
    if k_rows.numel():
        o, m = kernel(q_BHSD.index_select(2, q_rows), k_BHSD.index_select(2, k_rows), v_BHSD.index_select(2, k_rows),
                      scale=scale, return_lse=True)
        out.index_copy_(2, q_rows, o.float())
        lse.index_copy_(2, q_rows, m.float())
    return out, lse
