"""Plot engine.bench results: latency vs GPU count, one line per system, the compute floor dashed.

    python -m engine.bench.plot results.json plot.png      (engine.bench --plot does this itself)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

H200_BF16_FLOPS = 790e12
"""Dense bf16 matmul rate measured on the H200 machines (ANCHORS.md)."""


def flux_step_flops(height: int, width: int, text_tokens: int = 512) -> float:
    """Flux.1-dev per step (ANCHORS.md): 12.9 GFLOP per token in linears + 700,416·N² in attention."""
    n = (height // 16) * (width // 16) + text_tokens
    return 12.9e9 * n + 700_416 * n * n


def series_name(r: dict) -> str:
    system = {"shardiff": "shardiff", "diffusers": "diffusers", "diffusers-cp": "diffusers CP", "xfuser": "xfuser"}[
        r.get("system", "shardiff")
    ]
    layout = r["layout"].split(":")[0]
    kind = "Ulysses" if layout.lstrip("1").startswith(("u", "diffusers-cp-u", "xfuser-u")) or layout == "1" else layout
    mods = " + CUDA graphs" if r.get("cuda_graphs") else (" compiled" if r.get("compile") else " eager")
    return f"{system}{mods}" if kind == "Ulysses" or system == "diffusers" else f"{system} {layout}{mods}"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    sizes = sorted({(r["height"], r["width"]) for r in ok})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, (h, w) in zip(axes[0], sizes):
        lines = defaultdict(dict)
        for r in ok:
            if (r["height"], r["width"]) == (h, w):
                lines[series_name(r)][r["ranks"]] = min(r["per_step_ms"], lines[series_name(r)].get(r["ranks"], 1e18))
        for name, pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        gpus = sorted({r["ranks"] for r in ok})
        if ok and ok[0].get("model", "").startswith("flux"):
            floor = flux_step_flops(h, w) / H200_BF16_FLOPS * 1e3
            ax.plot(gpus, [floor / g for g in gpus], "k--", label="compute floor (790 TFLOP/s per GPU)")
        ax.set_title(f"{ok[0]['model']} {h}×{w}, bf16, ms per step")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("ms per denoising step")
        ax.set_xticks(gpus)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    plot(json.load(open(sys.argv[1])), sys.argv[2])
