"""The Ray Serve deployment (engine/serve/ray.py) on a local Ray instance of 2 CPUs: 2 replicas of the
`shapes` model, one gloo process each, real HTTP through Ray Serve's proxy on 127.0.0.1.

The answers are engine.serve's (the same routes, fields, errors; the image equals the CLI's); killing
one replica's controller process (the Ray actor): Ray replaces it, and requests keep being answered.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

import ray.serve  # noqa: F401  (the test extra installs Ray Serve: missing, this file fails, never skips)

from serve_server import REPO, env, wait_for  # noqa: E402
from test_serve import error_of, image_of  # noqa: E402

P1 = "a red circle top left on a white background"
STEPS = 4


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from engine import EngineConfig
    from engine.serve.ray import APP_NAME, deployment, replica_setup

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the replicas' ranks run on the CPU, whatever this machine has
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config, options = replica_setup(EngineConfig(), gpus_per_replica=None, procs_per_replica=1,
                                        restart_backoff_s=0.2)
        serve.run(deployment(config, options, replicas=2, cpus=1), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids(url: str, n: int = 2) -> set[int]:
    """The replicas' processes (the parents of their ranks), asking /health until `n` distinct ones answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while len(seen) < n:
        assert time.monotonic() < deadline, seen
        r = httpx.get(f"{url}/health", timeout=30)
        if r.status_code == 200:
            seen |= {psutil.Process(pid).ppid() for pid in r.json()["workers"]}
    return seen


def test_the_answers_are_engine_serves(url, tmp_path):
    out = tmp_path / "cli.png"
    cli = subprocess.run([sys.executable, "-m", "engine.generate", "--prompt", P1, "--seed", "5", "--steps", str(STEPS),
                          "--output", str(out)], cwd=REPO, env=env(), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=180)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    http = httpx.Client(base_url=url, timeout=120)
    r = http.post("/v1/images/generations", json={"prompt": P1, "seed": 5, "num_inference_steps": STEPS})
    answer = r.json()
    assert {"id", "created", "data", "seed", "size", "parameters", "timings", "usage", "lora"} <= set(answer)
    assert answer["seed"] == 5 and answer["size"] == "64x64" and answer["parameters"]["steps"] == STEPS
    assert r.headers["X-Request-Id"] == answer["id"]  # Ray's id, taken as the request's
    assert np.array_equal(image_of(r), np.asarray(Image.open(out).convert("RGB")))
    # Our errors, our routes, through Ray's proxy.
    assert "unknown field(s) 'frame_count'" in error_of(http.post("/v1/images/generations",
                                                                  json={"prompt": "x", "frame_count": 3}), 400)
    assert "no adapter named 'nope'" in error_of(http.post("/v1/images/generations",
                                                           json={"prompt": "x", "lora": {"nope": 1}}), 400)
    assert http.get("/v1/models").json()["data"][0]["id"] == "shapes"
    assert http.get("/health").json()["status"] == "ready"
    assert "shardiff_requests_total" in http.get("/metrics").text


def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(url):
    before = replica_pids(url)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    answered = 0
    deadline = time.monotonic() + 180
    while True:  # every answer while Ray notices and replaces it: the survivor's image, or Ray's refusal
        assert time.monotonic() < deadline, "the replica was not replaced"
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": P1, "seed": 5, "num_inference_steps": 1},
                       timeout=120)
        answered += r.status_code == 200
        now = replica_pids(url, 1)
        if answered >= 3 and now - before:
            break
    after = replica_pids(url)
    assert victim not in after and len(after - before) == 1, (before, after)
    wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE)
    for _ in range(4):
        assert httpx.post(f"{url}/v1/images/generations", json={"prompt": P1, "num_inference_steps": 1},
                          timeout=120).status_code == 200
