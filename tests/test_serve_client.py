"""`serve.start` in the test's own process (no torchrun) and its Python clients: the same images from
several threads, from the async form, and over HTTP; cancelling an awaited request; the server ends
with the client."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from engine import EngineConfig, GenerateRequest, serve
from engine.limits import ModelLimits

P1 = "a red circle top left on a white background"
P2 = "a large green triangle in the center on a black background"


@pytest.fixture(scope="module")
def client():
    # No restart allowed: the last test kills a rank and the server must give up. A warm-up size makes
    # /health wait for one generation first.
    c = serve.start(EngineConfig(), procs=2, port=0, max_queue=8, max_restarts=0, warmup_sizes=((64, 64),),
                    max_steps=100_000)
    yield c
    c.close()


def alive(pids) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def pixels(result) -> np.ndarray:
    return np.asarray(result.image.convert("RGB"))


def test_threads_get_the_same_images_as_one_at_a_time(client):
    requests = [GenerateRequest(prompt=p, seed=s, steps=2) for p, s in ((P1, 1), (P2, 2), (P1, 3), (P2, 4), (P1, 1))]
    alone = [pixels(client.generate(r)) for r in requests[:4]]
    got: dict = {}

    def ask(i):
        got[i] = client.generate(requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, r in enumerate(requests):
        assert got[i].params["seed"] == r.seed and got[i].params["prompt"] == r.prompt
        assert np.array_equal(pixels(got[i]), alone[i % 4]), i
    assert len({got[i].params["request_id"] for i in got}) == len(requests)
    # The same request over HTTP: the PNG holds the same pixels and the parameters.
    with serve.connect(client.url) as http:
        over_http = http.generate(requests[1])
    assert np.array_equal(pixels(over_http), alone[1])
    assert over_http.params["seed"] == 2 and over_http.params["layout"] == "ulysses2"


def test_async_form_and_cancelling_an_awaited_request(client):
    async def main():
        a, b = await asyncio.gather(client.agenerate(GenerateRequest(prompt=P1, seed=1, steps=2)),
                                    client.agenerate({"prompt": P2, "seed": 2, "num_inference_steps": 2}))
        long = asyncio.ensure_future(client.agenerate(GenerateRequest(prompt=P1, steps=100_000), request_id="long"))
        while client.health()["running"] == 0:
            await asyncio.sleep(0.05)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return a, b

    a, b = asyncio.run(main())
    assert np.array_equal(pixels(a), pixels(client.generate(GenerateRequest(prompt=P1, seed=1, steps=2))))
    assert b.params["seed"] == 2
    # The cancelled request stopped on both ranks: the group serves the next one.
    assert client.generate({"prompt": P2, "num_inference_steps": 2}).params["steps"] == 2
    assert client.cancel("long") is None


def test_errors_are_the_servers_one_line_messages(client):
    with pytest.raises(serve.BadRequest, match="--height 72 is not a multiple of 16"):
        client.generate(GenerateRequest(prompt=P1, height=72, width=64))
    with pytest.raises(ValueError, match="--guidance must be a finite number"):
        client.generate({"prompt": P1, "guidance_scale": float("nan")})
    with pytest.raises(serve.DeadlineExceeded):
        client.generate(GenerateRequest(prompt=P1, steps=100_000), timeout=1.0)
    batch = client.generate_batch([GenerateRequest(prompt=P1, seed=s, steps=2) for s in (1, 2)])
    assert [r.params["seed"] for r in batch] == [1, 2]


def test_what_the_pipeline_refuses_on_every_rank_is_a_400_and_the_group_goes_on(client):
    # The controller's own check of the model's limit taken away: the request reaches the ranks, the
    # pipeline's check_inputs refuses it on each before the first collective, the ranks agree on it
    # (engine/runtime/gate.py), and the group serves on — twenty times in a row, no restart.
    controller = client.controller
    health, kept = client.health(), controller.model_limits
    controller.model_limits = ModelLimits(max_sequence_length=None)
    try:
        for i in range(20):
            with pytest.raises(serve.BadRequest, match="the pipeline refused the request: `max_sequence_length` "
                                                        f"cannot be greater than 512 but is {513 + i}"):
                client.generate(GenerateRequest(prompt=P1, steps=2, max_sequence_length=513 + i))
    finally:
        controller.model_limits = kept
    after = client.health()
    assert after["status"] == "ready" and after["generation"] == health["generation"]
    assert after["workers"] == health["workers"]
    assert controller.metrics.restarts.labels("0")._value.get() == 0
    assert controller.metrics.requests.labels("rejected")._value.get() >= 20
    assert client.generate(GenerateRequest(prompt=P1, seed=1, steps=2)).params["steps"] == 2


def test_past_its_restarts_the_server_gives_up_with_the_cause(client):
    pids = client.health()["workers"]
    assert client.controller.metrics.requests.labels("ok")._value.get() > 0
    got: dict = {}

    def ask():
        try:
            client.generate(GenerateRequest(prompt=P1, steps=100_000))
        except serve.ServeError as e:
            got["error"] = e

    t = threading.Thread(target=ask)
    t.start()
    while client.health()["running"] == 0:
        time.sleep(0.05)
    os.kill(pids[0], signal.SIGKILL)
    t.join(60)
    assert isinstance(got["error"], serve.WorkerFailure) and "rank 0 died (killed by SIGKILL)" in str(got["error"])
    assert client.close() == 1  # the exit status of a server that gave up
    assert "giving up" in client.controller.failure
    assert alive(pids) == []
    with pytest.raises(serve.Unavailable):
        client.controller.admit([GenerateRequest(prompt=P1)])


def test_input_images_travel_as_base64_and_arrive_as_the_same_pixels(tmp_path):
    from PIL import Image

    from engine.serve import api
    from engine.serve.client import request_body

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 2, (24, 40), dtype=np.uint8) * 255)
    mask.save(tmp_path / "mask.png")
    body = request_body(GenerateRequest(prompt="x", image=image, mask_image=str(tmp_path / "mask.png"), strength=0.4))
    assert isinstance(body["image"], str) and isinstance(body["mask_image"], str) and body["strength"] == 0.4
    (request,), _ = api.parse_body(body, model="m", max_images=1)
    assert np.array_equal(np.asarray(request.image), np.asarray(image))
    assert np.array_equal(np.asarray(request.mask_image), np.asarray(mask))
    assert request.strength == 0.4 and request.control_image is None
    # A body that already carries base64 (longer than any file name) passes through unchanged.
    from engine.serve.client import encode_images

    assert encode_images(body) == body
