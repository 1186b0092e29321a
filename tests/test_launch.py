"""launch: torchrun argv, env defaults, errors, --dry-run, and real 2-process CPU runs."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import cli, topology

REPO = Path(__file__).resolve().parents[1]


def _plan(argv, environ=None, gpus=0, cpus=8):
    return cli.plan(argv, environ or {}, visible_gpus=gpus, cpus=cpus, check_module=False)


def test_argv_uses_nproc_per_node_and_passes_module_args():
    p = _plan(["--procs", "2", "--", "--prompt", "a cat", "--steps", "4"])
    assert p.argv == ["--standalone", "--nproc-per-node", "2", "-m", "engine.generate",
                      "--prompt", "a cat", "--steps", "4"]
    assert "--nproc" not in p.argv
    assert p.command()[:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_default_is_all_visible_gpus_and_module_option():
    p = _plan(["--module", "engine.bench"], gpus=4)
    assert p.nproc == 4 and p.on_gpu
    assert p.argv[-2:] == ["-m", "engine.bench"]


def test_env_defaults():
    p = _plan(["--gpus", "2"], gpus=2, cpus=16)
    assert p.added_env == {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert _plan(["--procs", "4"], cpus=2).env["OMP_NUM_THREADS"] == "1"  # never 0


def test_env_defaults_do_not_override_user_values():
    user = {"OMP_NUM_THREADS": "3", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "NCCL_NVLS_ENABLE": "0"}
    p = _plan(["--gpus", "2"], user, gpus=2)
    assert p.added_env == {}
    assert {k: p.env[k] for k in user} == user
    # The legacy name counts as the user's choice too.
    p = _plan(["--gpus", "2"], {"NCCL_ASYNC_ERROR_HANDLING": "0"}, gpus=2)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in p.env


@pytest.mark.parametrize("argv, gpus, message", [
    (["--gpus", "0"], 2, "at least 1"),
    (["--gpus", "3"], 2, "more GPUs than the 2 visible"),
    ([], 0, "no CUDA GPUs visible; pass --procs"),
    (["--procs", "2", "--prompt", "x"], 0, "go after `--`"),
    (["--procs", "2", "--module", "engine/generate.py"], 0, "dotted module name"),
])
def test_invalid_arguments(argv, gpus, message):
    with pytest.raises(ValueError, match=message):
        _plan(argv, gpus=gpus)


def test_procs_beyond_the_visible_gpus_run_on_the_cpu():
    # One GPU, two processes asked for: two CPU processes, CUDA hidden from them (the engine then takes the
    # CPU and gloo by itself), and one line saying so.
    p = _plan(["--procs", "2", "--", "--prompt", "x"], {"CUDA_VISIBLE_DEVICES": "0"}, gpus=1, cpus=8)
    assert p.nproc == 2 and not p.on_gpu
    assert p.env["CUDA_VISIBLE_DEVICES"] == "" and p.added_env == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": ""}
    assert p.note == ("2 processes asked for, 1 GPU visible: running 2 CPU processes (gloo); "
                      "use --gpus 1 for the GPU")
    assert "CUDA hidden" in p.summary() and "2 CPU process(es)" in p.summary()
    three = _plan(["--procs", "3"], gpus=2)
    assert not three.on_gpu and three.note.endswith("use --gpus 2 for the 2 GPUs")
    # Enough GPUs: one per process, nothing hidden; --gpus is an explicit request for GPUs.
    two = _plan(["--procs", "2"], gpus=2)
    assert two.on_gpu and not two.note and "CUDA_VISIBLE_DEVICES" not in two.env
    with pytest.raises(ValueError, match="--gpus 2 asks for more GPUs than the 1 visible.*--procs 2 runs 2 CPU"):
        _plan(["--gpus", "2"], gpus=1)
    # No CUDA at all: CPU processes, nothing to hide or say.
    cpu = _plan(["--procs", "2"], gpus=0)
    assert not cpu.on_gpu and not cpu.note and "CUDA_VISIBLE_DEVICES" not in cpu.env


def test_fallback_is_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(topology, "visible_gpus", lambda: 1)
    assert cli.main(["--procs", "2", "--dry-run", "--", "--prompt", "x"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["launch: 2 processes asked for, 1 GPU visible: running 2 CPU processes (gloo); "
                                "use --gpus 1 for the GPU"]
    assert "CUDA_VISIBLE_DEVICES= " in out and "--nproc-per-node 2" in out


def test_server_ranks_follow_the_launcher_rule(monkeypatch):
    from engine import EngineConfig, serve

    monkeypatch.setattr(topology, "visible_gpus", lambda: 1)
    monkeypatch.setattr(topology, "usable_cpus", lambda: 8)
    world, threads, note = serve.world_size(procs=2)
    assert (world, threads) == (2, 4) and note.startswith("2 processes asked for, 1 GPU visible")
    assert serve.on_device(EngineConfig(), note).device == "cpu"
    assert serve.on_device(EngineConfig(), "").device is None
    with pytest.raises(ValueError, match="--device cuda asks for the GPU"):
        serve.on_device(EngineConfig(device="cuda"), note)
    with pytest.raises(ValueError, match="more GPUs than the 1 visible"):
        serve.world_size(gpus=2)
    assert serve.world_size(gpus=1)[::2] == (1, "")


def _launch(args, env_extra=None, timeout=60, cwd=REPO):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # force the CPU/gloo path even on a GPU box
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *([str(cwd)] if cwd != REPO else []), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_invalid_gpus_exits_nonzero_with_message():
    r = _launch(["--gpus", "0"])
    assert r.returncode != 0
    assert "at least 1" in r.stderr


def test_dry_run_prints_command_and_env():
    r = _launch(["--procs", "2", "--dry-run", "--", "--prompt", "a cat"],
                {"OMP_NUM_THREADS": "5"})
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("env OMP_NUM_THREADS=5 ")
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m engine.generate" in line
    assert line.endswith("--prompt 'a cat'")


WORKER = """
import os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if os.environ.get("FAIL_RANK") == str(rank):
    raise RuntimeError(f"rank {rank} fails on purpose")
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)  # the surviving rank blocks here when the other one died
assert t.item() == world * (world + 1) / 2, t
print(f"rank {rank}/{world} ok args={sys.argv[1:]}", flush=True)
dist.destroy_process_group()
"""


@pytest.fixture
def worker_dir(tmp_path):
    (tmp_path / "tiny_dist_worker.py").write_text(textwrap.dedent(WORKER))
    return tmp_path


def test_end_to_end_two_cpu_processes(worker_dir):
    r = _launch(["--procs", "2", "--module", "tiny_dist_worker", "--", "--x", "1"],
                cwd=worker_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rank 0/2 ok args=['--x', '1']" in r.stdout
    assert "rank 1/2 ok" in r.stdout
    assert "launch: tiny_dist_worker on 2 CPU process(es)" in r.stderr


def test_failing_rank_stops_launch_promptly(worker_dir):
    start = time.monotonic()
    r = _launch(["--procs", "2", "--module", "tiny_dist_worker"],
                {"FAIL_RANK": "1"}, cwd=worker_dir)
    assert r.returncode != 0
    assert time.monotonic() - start < 30
    assert "fails on purpose" in r.stdout + r.stderr
