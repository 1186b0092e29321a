"""`python -m engine.serve --replicas 2` (two groups of one gloo process, the `shapes` model, real HTTP on
127.0.0.1) with two named LoRA adapters: one server for the module (tests/serve_server.py).

Two requests at once run on the two groups at the same time and give the CLI's images; a request's
adapters give the CLI's image with those LoRAs; an unknown adapter is a 400 before any rank works;
killing a rank of one group fails only its request while the other group keeps answering. The
dispatch rule (engine/serve/dispatch.py) is tested alone at the end, without processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve_server import REPO, Server, env, wait_for
from test_serve import error_of, image_of

P1 = "a red circle top left on a white background"
P2 = "a blue square bottom right on a yellow background"
LONG = 100_000


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for i, name in enumerate(("style", "other")):
        g = torch.Generator().manual_seed(i)
        out[name] = str(root / f"{name}.safetensors")
        save_file({f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight": torch.randn(4, 128, generator=g),
                   f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight": torch.randn(128, 4, generator=g)},
                  out[name])
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, loras):
    s = Server(tmp_path_factory.mktemp("replicas"), "--replicas", "2", "--lora", f"style={loras['style']}:0.8",
               "--lora", f"other={loras['other']}", "--max-steps", str(LONG), "--restart-backoff", "0.2")
    all_ready(s)
    yield s
    s.kill()


def all_ready(server, timeout: float = 240) -> dict:
    wait_for(lambda: all(g["status"] == "ready" for g in server.health().json()["groups"]), timeout,
             "every group to be ready")
    return server.health().json()


def cli_image(tmp_path, *args) -> np.ndarray:
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.png"
    r = subprocess.run([sys.executable, "-m", "engine.generate", "--output", str(out), *args], cwd=REPO, env=env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return np.asarray(Image.open(out).convert("RGB"))


def post_together(server, bodies: list[dict]) -> list[httpx.Response]:
    answers: list = [None] * len(bodies)

    def ask(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            answers[i] = c.post("/v1/images/generations", json=bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


REFERENCE: dict = {}


def test_two_requests_at_once_run_on_both_groups_at_the_same_time(server, tmp_path):
    health = server.health().json()
    assert health["replicas"] == 2 and health["world_size"] == 1 and len(health["workers"]) == 2
    a, b = post_together(server, [dict(prompt=P1, seed=5, num_inference_steps=6),
                                  dict(prompt=P2, seed=6, num_inference_steps=6)])
    ta, tb = a.json()["timings"], b.json()["timings"]
    assert {a.json()["group"], b.json()["group"]} == {0, 1}
    # Neither waited behind the other: on one group the second would queue for the first's whole run.
    assert ta["queue_s"] < tb["generate_s"] / 2 and tb["queue_s"] < ta["generate_s"] / 2, (ta, tb)
    assert np.array_equal(image_of(a), cli_image(tmp_path, "--prompt", P1, "--seed", "5", "--steps", "6"))
    assert np.array_equal(image_of(b), cli_image(tmp_path, "--prompt", P2, "--seed", "6", "--steps", "6"))
    REFERENCE["plain"] = image_of(a)


def test_each_request_runs_its_adapters_and_gets_the_clis_image(server, loras, tmp_path):
    listed = server.http.get("/v1/loras").json()["data"]
    assert [(d["id"], d["scale"]) for d in listed] == [("style", 0.8), ("other", 1.0)]
    body = dict(prompt=P1, seed=5, num_inference_steps=6)
    style, other = post_together(server, [dict(body, lora={"style": 0.8}), dict(body, lora={"other": None})])
    assert style.json()["lora"] == {"style": 0.8} and other.json()["lora"] == {"other": 1.0}
    want_style = cli_image(tmp_path, "--prompt", P1, "--seed", "5", "--steps", "6", "--lora", f"{loras['style']}:0.8")
    want_other = cli_image(tmp_path, "--prompt", P1, "--seed", "5", "--steps", "6", "--lora", loras["other"])
    assert np.array_equal(image_of(style), want_style)
    assert np.array_equal(image_of(other), want_other)
    assert not np.array_equal(want_style, REFERENCE["plain"]) and not np.array_equal(want_other, want_style)
    # Switched back: no adapter is the base image again (the weights restored bit for bit), and a group
    # that holds an adapter says so.
    groups = {d["id"]: d["groups"] for d in server.http.get("/v1/loras").json()["data"]}
    ran = {"style": [style.json()["group"]], "other": [other.json()["group"]]}
    assert ran["style"] != ran["other"] and groups == ran  # both free at once: one each, as in the first test
    again = [server.post(**body, lora={}) for _ in range(2)]
    for r in again:
        assert r.json()["lora"] == {} and np.array_equal(image_of(r), REFERENCE["plain"])
    assert sum(r.json()["timings"]["lora_s"] > 0 for r in again) >= 1


@pytest.mark.parametrize("lora, fragment", [
    ({"nope": 1.0}, "no adapter named 'nope'; this server has other, style"),
    ({"style": "x"}, "the scale of 'style' must be a finite number"),
    ({"/etc/passwd": 1.0}, "no adapter named '…'"),  # a path is never echoed
    ("style", "lora must be an object"),
])
def test_an_unknown_adapter_is_a_400_before_any_rank_works(server, lora, fragment):
    before = server.answers()
    message = error_of(server.post(prompt=P1, lora=lora), 400)
    assert fragment in message, message
    assert server.metric('shardiff_requests_total{outcome="rejected"}') >= 1 and server.answers() == before + 1


def test_an_edit_form_takes_lora_as_json_text(server):
    import io

    png = io.BytesIO()
    Image.fromarray(REFERENCE["plain"]).save(png, format="PNG")
    form = {"prompt": P2, "strength": "0.5", "num_inference_steps": "2", "seed": "3"}
    bad = server.http.post("/v1/images/edits", data={**form, "lora": '{"nope": 1}'},
                           files={"image": ("in.png", png.getvalue(), "image/png")})
    assert "no adapter named 'nope'" in error_of(bad, 400)
    ok = server.http.post("/v1/images/edits", data={**form, "lora": '{"style": 0.5}'},
                          files={"image": ("in.png", png.getvalue(), "image/png")})
    assert ok.status_code == 200 and ok.json()["lora"] == {"style": 0.5}


def test_killing_a_rank_of_one_group_fails_only_its_request(server):
    health = all_ready(server)
    answers: dict = {}

    def long():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            answers["long"] = c.post("/v1/images/generations", json={"prompt": P1, "num_inference_steps": LONG})

    t = threading.Thread(target=long)
    t.start()
    wait_for(lambda: server.health().json()["running"] == 1, what="the long request to run")
    busy = next(g for g in server.health().json()["groups"] if g["running"])
    os.kill(busy["workers"][0], signal.SIGKILL)
    t.join(60)
    assert "rank 0 died (killed by SIGKILL)" in error_of(answers["long"], 500)
    # The other group answers while this one restarts, and /health stays 200 naming both states.
    wait_for(lambda: server.health().json()["groups"][busy["group"]]["status"] != "ready", what="the restart")
    before = server.health()
    r = server.post(prompt=P1, seed=5, num_inference_steps=6)
    down = before.json()["groups"][busy["group"]]
    assert before.status_code == 200 and down["status"] in ("restarting", "starting", "warming"), before.json()
    assert "rank 0 died (killed by SIGKILL)" in down["last_failure"]
    assert np.array_equal(image_of(r), REFERENCE["plain"])
    if server.health().json()["groups"][busy["group"]]["status"] != "ready":
        assert r.json()["group"] != busy["group"]
    after = all_ready(server)
    assert after["groups"][busy["group"]]["generation"] == 1
    assert after["groups"][1 - busy["group"]]["workers"] == health["groups"][1 - busy["group"]]["workers"]
    assert server.metric(f'shardiff_restarts_total{{group="{busy["group"]}"}}') == 1
    assert server.metric(f'shardiff_restarts_total{{group="{1 - busy["group"]}"}}') == 0


# ------------------------------------------------------------------ the dispatch rule alone


def _job(name, key):
    return SimpleNamespace(name=name, lora_key=key, passed=0)


def test_dispatch_prefers_a_group_holding_the_adapters_within_the_pass_bound():
    from engine.serve.dispatch import pick

    a, b = (("a", 1.0),), (("b", 1.0),)
    group_a, group_b = SimpleNamespace(fused=a), SimpleNamespace(fused=b)
    # The head goes to the free group that holds its adapters, whatever their order.
    queued = [_job("1", b), _job("2", a)]
    assert pick(queued, [group_a, group_b], 4) == (queued[0], group_b)
    # One free group holding `a`: the younger `a` request runs first and the head counts one pass ...
    queued = [_job("head", b), _job("x", a)]
    assert pick(queued, [group_a], 2) == (queued[1], group_a) and queued[0].passed == 1
    # ... until it has been passed over max_passes times: then it runs, and the group switches.
    queued[0].passed = 2
    assert pick(queued, [group_a], 2) == (queued[0], group_a)
    # max_passes 0: strict arrival order.
    queued = [_job("head", b), _job("x", a)]
    assert pick(queued, [group_a], 0) == (queued[0], group_a)
    # Nothing may go first: the head runs on the free group whose adapters the fewest queued requests want.
    queued = [_job("head", ()), _job("y", a)]
    queued[0].passed = 4
    assert pick(queued, [group_a, group_b], 4) == (queued[0], group_b)
    assert pick([], [group_a], 4) is None and pick(queued, [], 4) is None


def test_each_group_gets_its_own_slice_of_the_visible_gpus(monkeypatch):
    from launch import topology

    from engine import EngineConfig
    from engine.serve.group import group_devices

    monkeypatch.setattr(topology, "visible_gpus", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert group_devices(2, 4, EngineConfig()) == [("0", "1", "2", "3"), ("4", "5", "6", "7")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,6,5,4,3,2,1,0")
    assert group_devices(4, 2, EngineConfig()) == [("7", "6"), ("5", "4"), ("3", "2"), ("1", "0")]
    # One group, CPU ranks, or fewer GPUs than ranks: the ranks see what the server sees.
    assert group_devices(1, 8, EngineConfig()) == [None]
    assert group_devices(2, 1, EngineConfig(device="cpu")) == [None, None]
    assert group_devices(2, 8, EngineConfig()) == [None, None]
