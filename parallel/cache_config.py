"""`--cache METHOD[:PARAM]`: which step cache, and its one parameter (parallel/plan/cache.py applies it).

Import-light (no diffusers, no torch.distributed): the engine's configuration parses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = ("off", "first-block", "taylorseer")
FIRST_BLOCK_DEFAULT = 0.08
"""Relative L1 change of the first block's residual under which the other blocks are reused."""
TAYLORSEER_DEFAULT = 4
"""Calls between two computed ones once TaylorSeer forecasts (after `TAYLORSEER_WARMUP` computed calls)."""
TAYLORSEER_WARMUP = 3


@dataclass(frozen=True)
class CacheConfig:
    method: str
    """"first-block" or "taylorseer"."""
    threshold: float = FIRST_BLOCK_DEFAULT
    interval: int = TAYLORSEER_DEFAULT

    def describe(self) -> str:
        if self.method == "first-block":
            return f"first-block:{self.threshold:g}"
        return f"taylorseer:{self.interval}"


def parse_cache(text: str | None) -> CacheConfig | None:
    """`--cache off | first-block[:THRESHOLD] | taylorseer[:INTERVAL]` → CacheConfig (None: off);
    ValueError naming what is wrong."""
    if text is None or text == "off":
        return None
    if not isinstance(text, str):
        raise ValueError(f"--cache must be a string such as first-block:0.08, got {text!r}")
    method, _, param = text.partition(":")
    if method == "first-block":
        try:
            threshold = float(param) if param else FIRST_BLOCK_DEFAULT
        except ValueError:
            raise ValueError(f"--cache first-block:THRESHOLD takes a number, got {param!r}") from None
        if not (math.isfinite(threshold) and 0 < threshold <= 1):
            raise ValueError(f"--cache first-block:{param}: the threshold is a relative change in (0, 1] "
                             f"(default {FIRST_BLOCK_DEFAULT}; larger reuses more steps)")
        return CacheConfig("first-block", threshold=threshold)
    if method == "taylorseer":
        try:
            interval = int(param) if param else TAYLORSEER_DEFAULT
        except ValueError:
            raise ValueError(f"--cache taylorseer:INTERVAL takes an integer, got {param!r}") from None
        if not 2 <= interval <= 16:
            raise ValueError(f"--cache taylorseer:{param}: the interval is 2 … 16 calls between computed ones "
                             f"(default {TAYLORSEER_DEFAULT})")
        return CacheConfig("taylorseer", interval=interval)
    raise ValueError(f"--cache {text!r}: unknown method {method!r}; use one of {', '.join(METHODS)} "
                     "(first-block[:THRESHOLD], taylorseer[:INTERVAL])")
