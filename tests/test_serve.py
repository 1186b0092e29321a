"""`python -m engine.serve` as a user runs it: a real server (2 gloo ranks, the `shapes` model) and real
HTTP on 127.0.0.1.

One server for the module (its start costs seconds), in its own process group so that a failing test
never leaves a process behind (the fixture's finalizer kills the group). The tests run in file order
and share it: images equal the CLI's, concurrent clients, queue full → 429, cancels, deadlines → 504,
bad inputs → 400 without a restart, a killed rank → 500 + restart, and last SIGTERM → every process gone.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from serve_server import REPO, Server, env, wait_for as _wait

P1 = "a red circle top left on a white background"
P2 = "a blue square bottom right on a yellow background"
LONG = 100_000  # denoising steps of a request that only ends when stopped (the server's --max-steps allows it)
_env = env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--max-queue", "4", "--restart-backoff", "0.2",
               "--stop-grace", "30", "--max-steps", str(LONG))
    yield s
    s.kill()


def image_of(response: httpx.Response, i: int = 0) -> np.ndarray:
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][i]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]["message"]


REFERENCE: dict = {}
"""(prompt, seed, steps) → the image the server gave first (the CLI's, per the first test)."""


def test_http_image_equals_cli_image(server, tmp_path):
    out = tmp_path / "cli.png"
    cli = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "engine.generate", "--prompt", P1, "--seed", "5", "--steps", "3", "--guidance", "2.5", "--output", str(out)],
        cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    r = server.post(prompt=P1, seed=5, num_inference_steps=3, guidance_scale=2.5)
    answer = r.json()
    assert answer["seed"] == 5 and answer["size"] == "64x64"
    assert answer["parameters"]["layout"] == "ulysses2" and answer["parameters"]["steps"] == 3
    assert r.headers["X-Request-Id"] == answer["id"]
    assert np.array_equal(image_of(r), np.asarray(Image.open(out).convert("RGB")))
    REFERENCE[(P1, 5, 3)] = image_of(r)
    # No seed: one is drawn, returned, and reproduces the image.
    drawn = server.post(prompt=P2, num_inference_steps=2)
    seed = drawn.json()["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert np.array_equal(image_of(drawn), image_of(server.post(prompt=P2, num_inference_steps=2, seed=seed)))


def test_http_img2img_equals_cli_img2img(server, tmp_path):
    # The input image travels as base64 and runs the img2img form, as --image does on the CLI.
    source = tmp_path / "in.png"
    Image.fromarray(REFERENCE[(P1, 5, 3)]).save(source)
    out = tmp_path / "cli.png"
    cli = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "engine.generate", "--prompt", P2, "--seed", "3", "--steps", "4", "--image", str(source),
         "--strength", "0.5", "--output", str(out)],
        cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    b64 = base64.b64encode(source.read_bytes()).decode()
    r = server.post(prompt=P2, seed=3, num_inference_steps=4, strength=0.5, image=b64)
    assert np.array_equal(image_of(r), np.asarray(Image.open(out).convert("RGB")))
    # A data: URL is the same image.
    r2 = server.post(prompt=P2, seed=3, num_inference_steps=4, strength=0.5, image="data:image/png;base64," + b64)
    assert np.array_equal(image_of(r2), image_of(r))


def test_concurrent_clients_each_get_their_own_image(server):
    jobs = [(P1, 11), (P2, 12), (P1, 13), (P2, 14)]
    answers: dict = {}

    def ask(prompt, seed):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            answers[(prompt, seed)] = c.post("/v1/images/generations",
                                             json={"prompt": prompt, "seed": seed, "num_inference_steps": 2})

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    images = {job: image_of(answers[job]) for job in jobs}
    for (prompt, seed), image in images.items():
        assert answers[(prompt, seed)].json()["seed"] == seed
        alone = server.post(prompt=prompt, seed=seed, num_inference_steps=2)
        assert np.array_equal(image, image_of(alone)), (prompt, seed)
    assert len({im.tobytes() for im in images.values()}) == len(jobs)
    # n = 2: the seeds seed and seed + 1, as the CLI's --num-images.
    two = server.post(prompt=P1, seed=11, n=2, num_inference_steps=2)
    assert [d["seed"] for d in two.json()["data"]] == [11, 12]
    assert np.array_equal(image_of(two, 0), images[(P1, 11)])


def _background(server, results: dict, key, **body):
    def run():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results[key] = c.post("/v1/images/generations", json=body)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_full_queue_answers_429_at_once_and_cancels(server):
    results: dict = {}
    threads = [_background(server, results, "long", prompt=P1, num_inference_steps=LONG, request_id="long")]
    _wait(lambda: server.health().json()["running"] == 1, what="the long request to run")
    for i in range(4):  # --max-queue 4
        threads.append(_background(server, results, i, prompt=P1, seed=5, num_inference_steps=3, request_id=f"q{i}"))
        _wait(lambda: server.health().json()["queue"] == i + 1, what="the queue to fill")
    start = time.monotonic()
    full = server.post(prompt=P1)
    assert time.monotonic() - start < 5
    assert "queue is full" in error_of(full, 429)
    assert int(full.headers["Retry-After"]) >= 1
    # An id already queued or running is refused, not answered twice.
    assert "already queued or running" in error_of(server.post(prompt=P1, request_id="q0"), 409)
    # Cancel a queued one, then the running one: it stops at an agreed step, the queue moves on.
    assert server.http.delete("/v1/images/generations/q3").json() == {"id": "q3", "status": "cancelled"}
    assert server.http.delete("/v1/images/generations/long").json() == {"id": "long", "status": "stopping"}
    assert server.http.delete("/v1/images/generations/nope").status_code == 404
    for t in threads:
        t.join(120)
    assert "cancelled" in error_of(results[3], 499)
    assert "cancelled" in error_of(results["long"], 499)  # answered at once; the ranks stop at a step
    for i in range(3):
        assert np.array_equal(image_of(results[i]), REFERENCE[(P1, 5, 3)])
    assert server.metric("shardiff_queue_depth") == 0


def test_a_client_that_disconnects_cancels_its_request(server):
    cancelled = server.metric('shardiff_requests_total{outcome="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json={"prompt": P1, "num_inference_steps": LONG},
                   timeout=httpx.Timeout(120, read=2.0))
    _wait(lambda: server.health().json()["running"] == 0, what="the abandoned request to stop")
    assert server.metric('shardiff_requests_total{outcome="cancelled"}') == cancelled + 1


def test_deadline_answers_504_and_the_server_keeps_serving(server):
    start = time.monotonic()
    r = server.post(prompt=P1, num_inference_steps=LONG, timeout=1.5)
    assert "passed its deadline" in error_of(r, 504)
    assert time.monotonic() - start < 15
    assert np.array_equal(image_of(server.post(prompt=P1, seed=5, num_inference_steps=3)), REFERENCE[(P1, 5, 3)])
    assert server.metric('shardiff_failures_total{cause="deadline"}') == 1


@pytest.mark.parametrize("body, fragments", [
    (b'{"prompt": "x",', ["not valid JSON"]),
    (b'["a red fox"]', ["JSON object"]),
    (b'{"negative_prompt": "x"}', ["prompt is missing"]),
    (b'{"prompt": "x", "frame_count": 3}', ["unknown field", "'frame_count'"]),
    (b'{"prompt": "x", "quality": "hd"}', ["quality must be auto, low, medium or high"]),
    (b'{"prompt": "x", "size": "65x64"}', ["--width 65", "multiple of 16", "64 or 80"]),
    (b'{"prompt": "x", "size": "big"}', ["WIDTHxHEIGHT"]),
    (b'{"prompt": "x", "num_inference_steps": 0}', ["--steps", "positive"]),
    (b'{"prompt": "x", "guidance_scale": NaN}', ["--guidance", "finite"]),
    (b'{"prompt": "x", "guidance_scale": Infinity}', ["--guidance", "finite"]),
    (b'{"prompt": "x", "seed": 18446744073709551616}', ["--seed", "2**64"]),
    (b'{"prompt": "x", "seed": -1}', ["--seed"]),
    (b'{"prompt": "x", "n": 0}', ["n must be"]),
    (b'{"prompt": "x", "response_format": "url"}', ["b64_json"]),
    (b'{"prompt": "x", "size": "1048576x1048576"}', ["needs at least", "GiB", "smaller size"]),
    (b'{"prompt": "x", "true_cfg_scale": 4}', ["needs a --negative-prompt"]),
    (b'{"prompt": "x", "model": "flux-dev"}', ["serves the model 'shapes'"]),
    (b'{"prompt": "x", "image": "/etc/hostname"}', ["image is not valid base64"]),
    (b'{"prompt": "x", "image": "aGVsbG8="}', ["image cannot be read as an image"]),
    (b'{"prompt": "x", "image": 7}', ["image must be a base64 string"]),
    (b'{"prompt": "x", "image": ["aGVsbG8=", "aGVsbG8="]}', ["this model takes 1 input image, got 2; send one"]),
    (b'{"prompt": "x", "strength": 0.5}', ["--strength", "needs --image"]),
    (b'{"prompt": "x", "pag_scale": 3}', ["--pag-scale", "perturbed-attention guidance"]),
    # Bounds: the operator's and the model's, before any rank works.
    (b'{"prompt": "x", "num_inference_steps": 1000000000}', ["--steps 1000000000", f"--max-steps {LONG}"]),
    (b'{"prompt": "' + b"a" * 10_001 + b'"}', ["10001 characters", "--max-prompt-chars 10000"]),
    (b'{"prompt": "x", "negative_prompt": "' + b"a" * 10_001 + b'"}', ["negative prompt", "--max-prompt-chars"]),
    (b'{"prompt": "x", "max_sequence_length": 1000}', ["--max-sequence-length 1000", "512 tokens"]),
    (b'{"prompt": "x", "request_id": "a/b"}', ["request_id must be", "printable ASCII"]),
    (b'{"prompt": "x", "request_id": "' + b"r" * 129 + b'"}', ["request_id must be 1 to 128"]),
    (b'{"prompt": "x", "output_format": "gif"}', ["output_format 'gif'", "png, jpeg or webp"]),
    (b'{"prompt": "x", "output_compression": 50}', ["output_compression is for output_format jpeg or webp"]),
    (b'{"prompt": "x", "background": "transparent"}', ["transparent", "opaque RGB"]),
    (b'{"prompt": "x", "partial_images": 2}', ["partial_images", "\"stream\": true"]),
    (b'{"prompt": "x", "stream": true, "partial_images": 4}', ["partial_images must be an integer from 0 to 3"]),
    # Bodies Python's own parser refuses: a 500 before, a 400 now.
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["not valid JSON", "nested too deeply"]),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", ["not valid JSON", "too many digits"]),
    (b'{"prompt": "\xff"}', ["not valid JSON", "not UTF-8"]),
])
def test_bad_input_is_a_400_with_the_clis_message_and_no_restart(server, body, fragments):
    before = server.health().json()["generation"]
    r = server.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    message = error_of(r, 400)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert server.health().json()["generation"] == before


def test_twenty_refused_requests_in_a_row_leave_the_group_untouched(server):
    # What reached the ranks and restarted the group before (a max_sequence_length over the model's 512,
    # a billion steps, a 10 MB prompt): each a 400 now, the group serving on, nothing restarted.
    health = server.health().json()
    restarts = server.metric('shardiff_restarts_total{group="0"}')
    bodies = [{"prompt": "x", "max_sequence_length": 513 + i} for i in range(18)]
    bodies += [{"prompt": "x", "num_inference_steps": 10**9}, {"prompt": "x" * 10_000_000}]
    for body in bodies:
        assert error_of(server.post(**body), 400)
    after = server.health()
    assert after.status_code == 200
    assert after.json()["generation"] == health["generation"] and after.json()["workers"] == health["workers"]
    assert server.metric('shardiff_restarts_total{group="0"}') == restarts == 0
    assert np.array_equal(image_of(server.post(prompt=P1, seed=5, num_inference_steps=3)), REFERENCE[(P1, 5, 3)])


def test_killing_a_rank_mid_request_gives_a_500_then_a_restart(server):
    results: dict = {}
    health = server.health().json()
    generation, pids = health["generation"], health["workers"]
    t = _background(server, results, "long", prompt=P1, num_inference_steps=LONG)
    _wait(lambda: server.health().json()["running"] == 1, what="the long request to run")
    os.kill(pids[1], signal.SIGKILL)
    t.join(60)
    message = error_of(results["long"], 500)
    assert "rank 1 died (killed by SIGKILL)" in message, message
    # While the group restarts: 503, and a request sent now waits in the queue and is answered after.
    states = []
    _wait(lambda: states.append(server.health()) or states[-1].status_code == 503, what="/health 503")
    queued = _background(server, results, "queued", prompt=P1, seed=5, num_inference_steps=3)
    after = server.wait_ready(120)
    assert after["generation"] == generation + 1 and not set(after["workers"]) & set(pids)
    assert states[-1].json()["status"] in ("restarting", "starting", "warming")
    queued.join(120)
    assert np.array_equal(image_of(results["queued"]), REFERENCE[(P1, 5, 3)])
    assert np.array_equal(image_of(server.post(prompt=P1, seed=5, num_inference_steps=3)), REFERENCE[(P1, 5, 3)])
    assert server.metric('shardiff_restarts_total{group="0"}') == 1
    assert server.metric('shardiff_failures_total{cause="rank_died"}') == 1
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


def test_sigterm_finishes_the_running_request_and_leaves_no_process(server):
    family = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(family) >= 3  # the controller and its two ranks (and multiprocessing's resource tracker)
    results: dict = {}
    t = _background(server, results, "last", prompt=P1, seed=5, num_inference_steps=3)
    _wait(lambda: server.health().json()["running"] == 1 or "last" in results, what="the request to run")
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert np.array_equal(image_of(results["last"]), REFERENCE[(P1, 5, 3)])
    assert server.proc.wait(60) == 0, server.text()
    _wait(lambda: not any(psutil.pid_exists(p) for p in family), timeout=10, what="every process to exit")
    shutdown = server.text().split("SIGTERM: shutting down")[1]
    assert "Traceback" not in shutdown, shutdown


@pytest.mark.parametrize("args, fragment, status", [
    # Found by the rank (exit 1), or before any rank starts (exit 2).
    (["--procs", "1", "--ulysses", "2"], "--ulysses 2 does not divide the 1 sequence-parallel processes", 1),
    (["--procs", "1", "--warmup-sizes", "72x64"], "--warmup-sizes 72x64: --width 72 is not a multiple of 16", 2),
    (["--procs", "1", "--lora", "missing.safetensors"], "missing.safetensors", 2),  # before any rank starts
])
def test_a_configuration_mistake_ends_the_server_at_once_with_one_line(args, fragment, status):
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--port", "0", *args],
                       cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert r.returncode == status, r.stderr
    if status == 2:  # found without a rank: no worker was started
        assert "model group" not in r.stderr and "listening on" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
