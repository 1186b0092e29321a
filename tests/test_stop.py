"""engine/runtime/stop.py: a stop asked for on ONE rank stops every rank at the same step, with no hang,
and the next request is the image it would have been (no state left behind: Flux true CFG's paired
calls, data-parallel slices with an uneven share)."""

from __future__ import annotations

import numpy as np

from harness import run_distributed


def _stop_everywhere():
    import torch.distributed as dist

    from engine import Engine, EngineConfig, GenerateRequest
    from engine.runtime.stop import AgreedStop, Stopped

    rank = dist.get_rank()
    out = {}
    cases = [
        # Flux true CFG split over 2 ranks: two denoiser calls per step, paired across the cfg ranks.
        ("cfg", EngineConfig(cfg=2), [GenerateRequest(prompt="a red circle top left on a white background",
                                                      negative_prompt="", true_cfg_scale=2.0, steps=4, seed=1)],
         1, 1),
        # UNet data parallel, 3 images on 2 slices (2 + 1); only the rank drawing one image is asked.
        ("dp", EngineConfig(model="sd1.5-tiny", parallel="dp"),
         [GenerateRequest(prompt="a fox", steps=3, seed=s, height=64, width=64) for s in range(3)], 0, 1),
    ]
    for name, config, requests, asker, at in cases:
        engine = Engine(config)
        stop = AgreedStop(engine)
        before = engine.generate_batch(requests, output_type="np", on_step=stop)
        stop.settle()
        stop.reset()
        stopped_at = None

        def on_step(step):
            if rank == asker and step == at:
                stop.request()
            stop(step)

        try:
            engine.generate_batch(requests, output_type="np", on_step=on_step)
        except Stopped as e:
            stopped_at = str(e)
        stop.settle()
        stop.reset()
        after = engine.generate_batch(requests, output_type="np", on_step=stop)
        stop.settle()
        same = None if before is None else all(np.array_equal(a.image, b.image) for a, b in zip(before, after))
        out[name] = (stopped_at, same, engine.parallel.describe())
        engine.close()
    return out


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step():
    ranks = run_distributed(_stop_everywhere, 2, timeout=300)
    cfg = [r["cfg"] for r in ranks]
    assert cfg[0][2] == "cfg2"
    # Asked for after step 1 on rank 1: both ranks read it one step later, after step 2.
    assert [c[0] for c in cfg] == ["stopped after step 2"] * 2
    assert cfg[0][1] is True
    dp = [r["dp"] for r in ranks]
    assert dp[0][2] == "dp2"
    # Asked for after step 1 on rank 0: its slice stops its first image after step 2; rank 1's slice
    # (its one image, drawn to the end) learns of it at the data-parallel agreement before the gather.
    assert dp[0][0] == "stopped after step 2" and dp[1][0] == "stopped on another data-parallel slice"
    assert dp[0][1] is True
