"""Layout names of the benchmarks: `u4`, `r2`, `u2r2`, `c2u2`, `t4s`, `t4o:compile`, `xfuser-u4`, … (see
`python -m engine.bench --help`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardiff_parallel.config import ParallelConfig

AXIS_LETTERS = {"c": "cfg", "u": "ulysses", "r": "ring", "t": "tp", "d": "dp"}
# Longest first: "cache-dit-db-u4" must not read as cache-dit with degrees "db-u4".
BASELINES = ("cache-dit-db", "cache-dit", "diffusers-cp", "xfuser")
APPROXIMATE = ("cache-dit-db",)
"""Baselines that skip work (cache-dit's DBCache reuses block residuals across steps): their figures are
not exact work against exact work, and the table says so beside their fidelity."""


@dataclass(frozen=True)
class Layout:
    name: str
    system: str
    """shardiff, diffusers, or one of BASELINES."""
    config: ParallelConfig
    compile: bool
    graphs: bool = False
    """Replay each forward as a CUDA graph (with compile)."""
    head_chunks: int = 1
    """Ulysses exchanges pipelined over this many head chunks (`h2` in the name)."""
    quantize: str = "off"
    """`:fp8`: ours with `--quantize fp8`; plain diffusers with torchao's float8 (dynamic, row-wise) on the
    same linears — what a user of diffusers tries first."""
    quantize_qkv: str = "off"
    """`:qkv8`: ours with `--quantize-qkv fp8` (attention's inputs rounded to FP8, sent so through Ulysses)."""
    cache: str = "off"
    """`:fb[THRESHOLD]` / `:ts[INTERVAL]`: ours with `--cache first-block[:THRESHOLD]` / `taylorseer[:INTERVAL]`."""

    @property
    def approximate(self) -> bool:
        """Skips or approximates work: its fidelity is a trade, not a parity."""
        return self.system in APPROXIMATE or self.quantize != "off" or self.quantize_qkv != "off" or self.cache != "off"


def _degrees(text: str, name: str) -> ParallelConfig:
    # (letter, degree, "s" / "o" for the sequence / overlap form of TP — after a tp degree only).
    parts = re.findall(r"([curtd])(\d+)([so]?)", text)
    if not parts or "".join(a + n + s for a, n, s in parts) != text or any(s and a != "t" for a, _, s in parts):
        raise ValueError(f"unknown layout {name!r}: see `python -m engine.bench --help` for layout names")
    forms = {"": "allreduce", "s": "sequence", "o": "overlap"}
    tp_comm = next((forms[s] for _, _, s in parts if s), "allreduce")
    return ParallelConfig(**{AXIS_LETTERS[a]: int(n) for a, n, _ in parts}, tp_comm=tp_comm)


def _modifiers(name: str, modifiers: list[str]) -> dict:
    """`compile`, `graphs` (compile + CUDA graphs), `fp8`, `qkv8`, `fb[THRESHOLD]`, `ts[INTERVAL]`, in any order."""
    out = dict(compile=False, graphs=False, quantize="off", quantize_qkv="off", cache="off")
    for m in modifiers:
        if m in ("compile", "graphs"):
            out["compile"] = True
            out["graphs"] = out["graphs"] or m == "graphs"
        elif m == "fp8":
            out["quantize"] = "fp8"
        elif m == "qkv8":
            out["quantize_qkv"] = "fp8"
        elif re.fullmatch(r"fb([0-9.]*)", m):
            out["cache"] = "first-block" + (f":{m[2:]}" if m[2:] else "")
        elif re.fullmatch(r"ts(\d*)", m):
            out["cache"] = "taylorseer" + (f":{m[2:]}" if m[2:] else "")
        else:
            raise ValueError(f"layout {name!r}: modifiers are :compile, :graphs (compile + CUDA graphs), :fp8, :qkv8 "
                             "(FP8 Q/K/V), :fb[THRESHOLD] (first-block cache), :ts[INTERVAL] (TaylorSeer)")
    return out


def parse_layout(name: str) -> Layout:
    base, *modifiers = name.split(":")
    mods = _modifiers(name, modifiers)
    if base == "diffusers":
        if mods["cache"] != "off" or mods["quantize_qkv"] != "off":
            raise ValueError(f"layout {name!r}: the step caches and :qkv8 are ours (cache-dit-db-… is cache-dit's)")
        return Layout(name, "diffusers", ParallelConfig(), **mods)
    if base == "1":
        return Layout(name, "shardiff", ParallelConfig(), **mods)
    for system in BASELINES:
        if base.startswith(system + "-"):
            if mods["graphs"] or mods["quantize"] != "off" or mods["quantize_qkv"] != "off" or mods["cache"] != "off":
                raise ValueError(f"layout {name!r}: ':graphs', ':fp8', ':qkv8' and the caches are for our layouts and "
                                 "plain diffusers")
            config = _degrees(base[len(system) + 1 :], name)
            if config.tp_comm != "allreduce":
                raise ValueError(f"layout {name!r}: the sequence forms of TP (`s` / `o` after the tp degree) are ours only")
            return Layout(name, system, config, mods["compile"])
    base, chunks = re.fullmatch(r"(.*?)(?:h(\d+))?", base).groups()
    return Layout(name, "shardiff", _degrees(base, name), head_chunks=int(chunks or 1), **mods)
