"""engine/runtime/gate.py on 2 gloo processes: a pipeline call that raises on every rank before its first
collective is agreed on as a request error; one that raises on some ranks only, or fatally, breaks the
group on every rank — and in no case does a rank wait for one that left."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed


def _engine():
    denoiser = torch.nn.Linear(2, 2)
    return SimpleNamespace(denoiser=denoiser, controlnet=None, pipe=SimpleNamespace(), vae_split=None,
                           text_encoders=SimpleNamespace(plan=SimpleNamespace(placement="replicated", degrees={})),
                           parallel=SimpleNamespace(dp=1))


def _call(engine, raise_before):
    """A pipeline call: prepare (maybe raising), then the denoiser twice, each followed by a collective."""
    if raise_before is not None:
        raise raise_before
    out = []
    for _ in range(2):
        y = engine.denoiser(torch.ones(1, 2))
        dist.all_reduce(y)
        out.append(y)
    return out


def _scenario(errors):
    from engine.runtime.gate import PeerFailed, PreparationGate, RequestRefused

    engine = _engine()
    gate = PreparationGate(engine)
    rank = dist.get_rank()
    outcomes = []
    for error in errors:  # one pipeline call per entry: every rank's error (or None) before its first collective
        try:
            with gate.pipeline_call():
                _call(engine, error[rank])
            outcomes.append("ok")
        except RequestRefused as e:
            outcomes.append(f"refused: {e}")
        except PeerFailed:
            outcomes.append("peer failed")
        except Exception as e:  # noqa: BLE001
            outcomes.append(f"own {type(e).__name__}")
        except MemoryError:
            outcomes.append("own MemoryError")
    gate.remove()
    return outcomes


def test_the_ranks_agree_on_an_error_raised_before_the_first_collective():
    bad = ValueError("`max_sequence_length` cannot be greater than 512 but is 1000")
    calls = [
        [None, None],                                  # all well: the denoiser runs, the gate lets it
        [bad, bad],                                    # every rank refuses: a request error, the group goes on
        [None, None],
        [ValueError("only mine"), None],               # one rank alone: the group is broken, nobody waits
        [ValueError("mine"), MemoryError()],           # fatal somewhere: broken
    ]
    r0, r1 = run_distributed(_scenario, 2, calls, timeout=60)
    refused = "refused: the pipeline refused the request: `max_sequence_length` cannot be greater than 512 but is 1000"
    assert r0 == ["ok", refused, "ok", "own ValueError", "own ValueError"]
    assert r1 == ["ok", refused, "ok", "peer failed", "own MemoryError"]


def test_one_rank_needs_no_collective():
    from engine.runtime.gate import PreparationGate, RequestRefused

    engine = _engine()
    gate = PreparationGate(engine)
    with pytest.raises(RequestRefused, match="the pipeline refused the request: no"):
        with gate.pipeline_call():
            raise ValueError("no")
    with pytest.raises(MemoryError):
        with gate.pipeline_call():
            raise MemoryError()
    with gate.pipeline_call():
        assert engine.denoiser(torch.ones(1, 2)).shape == (1, 2)
    gate.remove()
