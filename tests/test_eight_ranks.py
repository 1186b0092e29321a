"""Every 8-rank layout of the 8-GPU scaling run, proven on 8 gloo processes with the tiny
models: the same engine.bench command the GPU run uses, checked for parity with one rank.

Uneven on purpose: 112×144 gives 63 image tokens, and 77 / 16 text tokens — none divide 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CASES = {
    "flux-tiny": ("77", "1,u8,u4r2,u2r4,r8,t2u4,t4u2,t2r4"),
    "sd3-tiny": ("16", "1,c2r4,c2u2r2,c2t2r2"),
}


@pytest.mark.parametrize("model", sorted(CASES))
def test_eight_rank_layouts_match_one_rank(model, tmp_path):
    text_tokens, layouts = CASES[model]
    out = tmp_path / "b.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
        "-m", "engine.bench", "--model", model, "--sizes", "112x144", "--steps", "2", "--repeats", "1",
        "--warmup", "0", "--text-tokens", text_tokens, "--layouts", layouts, "--json", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["layout"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(layouts.split(","))
    for name, r in results.items():
        assert "error" not in r, r
        assert r["rel_l2_vs_first"] <= 1e-4, f"{model} {name}: rel L2 {r['rel_l2_vs_first']:.2e} vs one rank"
