"""Parallel degrees of one job, validated once, before any collective.

Axes, outer to inner: dp × cfg × ring × ulysses × tp. Inner axes get consecutive ranks so that the
most talkative ones (tp, then ulysses' all-to-alls) stay on the fastest links (one node, NVLink);
ring only passes K/V blocks to a neighbour and tolerates slower links, so it sits outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("dp", "cfg", "ring", "ulysses", "tp")
# The forms of TP communication: parallel/tensor.py (all-reduce), parallel/tensor_seq.py (sequence, and
# overlap: the sequence form with each gather / reduce-scatter fused with its matmul).
TP_COMMS = ("allreduce", "sequence", "overlap")
UNSET_AXES = ("ring", "ulysses", "tp")
"""Axes whose degree a request may leave to the engine (None)."""


@dataclass(kw_only=True, frozen=True)
class Degrees:
    """The degree of each mesh axis, declared once: as asked for (EngineConfig, the CLI's --dp … --tp-comm,
    where ring, ulysses and tp may stay unset for the engine to choose) and, resolved, as ParallelConfig."""

    dp: int = 1
    """Data-parallel degree: independent images on different ranks."""
    cfg: int = 1
    """CFG-parallel degree: the guidance branches on different ranks (1, 2 or 3: PAG with CFG runs three)."""
    ring: int | None = None
    """Ring-attention degree: K/V blocks travel around a ring of ranks. Unset: what the ranks left after
    dp × cfg × tp × ulysses make (resolve_degrees)."""
    ulysses: int | None = None
    """Ulysses degree: all-to-all from sequence shards to head shards. Unset: the largest share of the ranks
    left after dp × cfg × tp that divides the heads; ring takes the rest (resolve_degrees)."""
    tp: int | None = None
    """Tensor-parallel degree: attention heads and MLP columns sharded. Unset (--tp auto): 1, unless the
    weights do not fit one GPU; then the smallest degree that makes them fit (engine/loading/auto_tp.py)."""
    tp_comm: str = "allreduce"
    """How TP communicates: "allreduce" (every TP rank holds all tokens between TP regions); "sequence"
    (each holds 1/tp of them: reduce-scatter / all-gather, parallel/tensor_seq.py); or "overlap" (the
    sequence form with the long collectives fused with their matmuls, which hides them on CUDA GPUs:
    parallel/collective_matmul.py; the fastest TP from 1536² up). No effect with tp 1."""

    def __post_init__(self):
        for a in AXES:
            v = getattr(self, a)
            if v is None and a in UNSET_AXES:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{a} must be a positive integer, got {v!r}")
        if self.cfg > 3:
            raise ValueError(f"--cfg is 1, 2 or 3 (guidance branches: uncond, cond and PAG's perturbed one), got {self.cfg}")
        check_tp_comm(self.tp_comm)


@dataclass(kw_only=True, frozen=True)
class ParallelConfig(Degrees):
    """The resolved degrees of one layout: every axis a number (an axis left unset is 1)."""

    def __post_init__(self):
        for a in UNSET_AXES:
            if getattr(self, a) is None:
                object.__setattr__(self, a, 1)
        super().__post_init__()

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, a) for a in AXES)

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ring × ulysses ranks share one sequence."""
        return self.ring * self.ulysses

    def degrees(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    @property
    def tp_sequence(self) -> bool:
        """TP in its sequence form (reduce-scatter / all-gather over tokens), overlapped or not."""
        return self.tp > 1 and self.tp_comm in ("sequence", "overlap")

    def describe(self) -> str:
        parts = [f"{a}{getattr(self, a)}" + (f"({self.tp_comm})" if a == "tp" and self.tp_sequence else "")
                 for a in AXES if getattr(self, a) > 1]
        return "×".join(parts) if parts else "single"

    def check_world_size(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"parallel degrees {self.degrees()} multiply to {self.world_size}, but {world_size} "
                f"process(es) were launched; for {world_size} processes choose degrees whose product is "
                f"{world_size}, e.g. {', '.join(_examples(world_size))}"
            )

    def check_heads(self, num_heads: int) -> None:
        """TP splits the heads evenly (each TP rank holds H/T whole heads, and its linears H/T of the
        width); Ulysses then shares a TP rank's H/T heads among its ranks, unevenly when it does not
        divide them (parallel/heads.py: 38 heads on --ulysses 4 → 10, 10, 9, 9), as long as every
        Ulysses rank gets at least one head."""
        if num_heads % self.tp:
            ok = [t for t in range(2, 9) if num_heads % t == 0]
            raise ValueError(
                f"the model has {num_heads} attention heads, which --tp {self.tp} does not divide (TP splits heads "
                f"evenly); TP degrees that divide them: {', '.join(map(str, ok)) or 'none'}"
            )
        local = num_heads // self.tp
        if self.ulysses > local:
            sp_options = [f"--ulysses {u} --ring {self.sp // u}" for u in _divisors(self.sp) if u <= local]
            raise ValueError(
                f"the model has {num_heads} attention heads"
                + (f" ({local} per TP rank of --tp {self.tp})" if self.tp > 1 else "")
                + f", fewer than --ulysses {self.ulysses}: every Ulysses rank needs at least one head; layouts over "
                f"the same {self.sp} sequence-parallel ranks that work: " + ", ".join(sp_options)
                + self._cfg_hint(num_heads)
            )

    def uneven_heads(self, num_heads: int) -> bool:
        """Whether Ulysses shares the heads of a TP rank unevenly (the busiest rank holds one more)."""
        return self.ulysses > 1 and (num_heads // self.tp) % self.ulysses != 0

    def heads_note(self, num_heads: int, num_kv_heads: int = 0) -> str:
        """For the layout line: which query heads each Ulysses rank holds when not an equal share."""
        if not self.uneven_heads(num_heads):
            return ""
        from .heads import head_split

        local = num_heads // self.tp
        split = head_split(local, max(1, (num_kv_heads or num_heads) // self.tp), self.ulysses)
        return f"uneven heads: {'/'.join(map(str, split.q))} of {local} per Ulysses rank"

    def _cfg_hint(self, num_heads: int) -> str:
        """With guidance on, half the ranks can go to the cfg axis instead."""
        if self.cfg > 1 or self.sp % 2:
            return ""
        half = self.sp // 2
        options = [f"--cfg 2 --ulysses {u} --ring {half // u}" for u in _divisors(half) if u <= num_heads // self.tp]
        return "; with classifier-free guidance on, also " + ", ".join(options) if options else ""


def check_tp_comm(tp_comm: str) -> None:
    if tp_comm not in TP_COMMS:
        raise ValueError(f"--tp-comm must be {', '.join(TP_COMMS[:-1])} or {TP_COMMS[-1]}, got {tp_comm!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _examples(world_size: int) -> list[str]:
    out = [f"--ulysses {world_size}", f"--ring {world_size}"]
    for u in _divisors(world_size):
        if 1 < u < world_size:
            out.append(f"--ulysses {u} --ring {world_size // u}")
            break
    return out


def resolve_degrees(
    world_size: int,
    num_heads: int,
    *,
    ulysses: int | None = None,
    ring: int | None = None,
    tp: int = 1,
    cfg: int = 1,
    dp: int = 1,
    tp_comm: str = "allreduce",
) -> ParallelConfig:
    """Fill in unspecified sequence degrees so that every rank is used.

    The rule (documented in the README): the ranks left after dp × cfg × tp form the sequence-parallel
    group. If neither --ulysses nor --ring is given, Ulysses takes the largest share that divides the
    heads (its all-to-all is cheaper than passing K/V around a ring on one node) and Ring takes the
    rest. If only one is given, the other takes what is left. An explicit Ulysses degree that does not
    divide the heads is used as asked, with uneven heads per rank (`check_heads`); the automatic rule
    does not choose it, because whether the busiest rank's extra head costs more than Ring's K/V
    passing depends on the model, size and links (measure with engine.bench: `u4` vs `u2r2`).
    """
    fixed = dp * cfg * tp
    if world_size % fixed:
        raise ValueError(
            f"--dp {dp} × --cfg {cfg} × --tp {tp} = {fixed} does not divide the {world_size} launched processes"
        )
    sp = world_size // fixed
    if ulysses is None and ring is None:
        ulysses = math.gcd(sp, num_heads // math.gcd(num_heads, tp) if num_heads % tp == 0 else 1)
        ring = sp // ulysses
    elif ulysses is None:
        if sp % ring:
            raise ValueError(f"--ring {ring} does not divide the {sp} sequence-parallel processes")
        ulysses = sp // ring
    elif ring is None:
        if sp % ulysses:
            raise ValueError(f"--ulysses {ulysses} does not divide the {sp} sequence-parallel processes")
        ring = sp // ulysses
    cfg_ = ParallelConfig(dp=dp, cfg=cfg, ring=ring, ulysses=ulysses, tp=tp, tp_comm=tp_comm)
    cfg_.check_world_size(world_size)
    cfg_.check_heads(num_heads)
    return cfg_
