"""`python -m engine.serve` against careless and hostile clients, and OpenAI's own Python client.

One server for the module (2 gloo ranks, `shapes`), with an API key, a 1 MiB body limit and a 3 s
heartbeat timeout. In file order: OpenAI's client generates, edits (multipart) and streams unchanged;
the key, the Host check and the body's type; a body over the limit refused unread; every listening
socket on loopback; metrics count each answer once; a stopped rank noticed by its heartbeat; and
last, SIGTERM: 503s while draining, then exit 0.
"""

from __future__ import annotations

import base64
import io
import os
import select
import signal
import socket
import threading

import httpx
import numpy as np
import openai
import psutil
import pytest
from PIL import Image

from serve_server import Server, wait_for

KEY = "test-key-7f3a"
P1 = "a red circle top left on a white background"
P2 = "a blue square bottom right on a yellow background"
LONG = 100_000
LIMIT_MB = 1


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-api"), "--api-key", KEY, "--max-body-mb", str(LIMIT_MB),
               "--heartbeat-timeout", "3", "--drain-timeout", "3", "--restart-backoff", "0.2",
               "--max-steps", str(LONG), api_key=KEY)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]["message"]


def test_openai_client_generates_as_the_json_route_does(api, oai):
    r = oai.images.generate(prompt=P1, size="64x64", extra_body={"seed": 5, "num_inference_steps": 3})
    assert r.size == "64x64" and r.output_format == "png" and r.usage.output_tokens == 16  # (64 / 16)² tokens
    plain = api.post(prompt=P1, size="64x64", seed=5, num_inference_steps=3)
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(plain.json()["data"][0]["b64_json"]))
    # JPEG with OpenAI's compression field; the parameters travel in its EXIF.
    from engine.serve.encode import read_params

    jpeg = oai.images.generate(prompt=P1, output_format="jpeg", output_compression=80,
                               extra_body={"seed": 5, "num_inference_steps": 3})
    data = base64.b64decode(jpeg.data[0].b64_json)
    assert Image.open(io.BytesIO(data)).format == "JPEG" and read_params(data)["seed"] == 5
    # quality: a step count; num_inference_steps, when given, wins.
    assert api.post(prompt=P1, quality="low", seed=1).json()["parameters"]["steps"] == 7
    assert api.post(prompt=P1, quality="low", seed=1, num_inference_steps=2).json()["parameters"]["steps"] == 2
    assert oai.models.retrieve("shapes").id == "shapes"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("flux-dev")


def test_openai_client_edits_with_a_mask(api, oai):
    first = api.post(prompt=P1, seed=5, num_inference_steps=3).json()["data"][0]["b64_json"]
    source = png(Image.fromarray(pixels(first)))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 32))  # OpenAI's mask: transparent = edit
    extra = {"seed": 3, "num_inference_steps": 4, "strength": 0.9}
    r = oai.images.edit(image=("in.png", source, "image/png"), mask=("mask.png", png(mask), "image/png"), prompt=P2,
                        extra_body=extra)
    # The same request as JSON, with the mask the pipelines take (white = repaint).
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (0, 0, 32, 32))
    as_json = api.http.post("/v1/images/edits", json={"prompt": P2, "image": base64.b64encode(source).decode(),
                                                      "mask": base64.b64encode(png(white)).decode(), **extra})
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(as_json.json()["data"][0]["b64_json"]))
    assert as_json.json()["parameters"]["steps"] == 4
    with pytest.raises(openai.BadRequestError, match="takes 1 input image, got 2"):
        oai.images.edit(image=[("a.png", source, "image/png"), ("b.png", source, "image/png")], prompt=P2)
    with pytest.raises(openai.BadRequestError, match="--max-steps"):
        oai.images.edit(image=("in.png", source, "image/png"), prompt=P2, extra_body={"num_inference_steps": LONG + 1})


def test_openai_client_streams_partial_images(api, oai):
    events = list(oai.images.generate(prompt=P1, size="64x64", stream=True, partial_images=2,
                                      extra_body={"seed": 9, "num_inference_steps": 6}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].size == "64x64" and events[-1].usage.output_tokens == 16
    # Previews change nothing: the final image is the one a plain request gives.
    plain = api.post(prompt=P1, size="64x64", seed=9, num_inference_steps=6)
    assert np.array_equal(pixels(events[-1].b64_json), pixels(plain.json()["data"][0]["b64_json"]))
    # The partial images are the predicted clean image: the last one is close to the final image.
    assert np.abs(pixels(events[1].b64_json).astype(int) - pixels(events[-1].b64_json)).mean() < 16
    source = png(Image.fromarray(pixels(events[-1].b64_json)))
    edits = list(oai.images.edit(image=("in.png", source, "image/png"), prompt=P2, stream=True, partial_images=1,
                                 extra_body={"seed": 2, "num_inference_steps": 6}))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]


def test_the_api_key_the_host_and_the_body_type(api):
    bare = httpx.Client(base_url=api.url, timeout=30)
    assert bare.get("/health").status_code == 200  # a load balancer's check needs no key
    r = bare.get("/v1/models")
    assert "API key" in error_of(r, 401) and r.headers["WWW-Authenticate"] == "Bearer"
    assert error_of(bare.post("/v1/images/generations", json={"prompt": P1},
                              headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt=P1)
    # A browser's cross-origin "simple" POST (text/plain) is refused unread; no CORS header is given.
    r = api.http.post("/v1/images/generations", content=b'{"prompt": "x"}',
                      headers={"content-type": "text/plain", "origin": "https://evil.example"})
    assert "application/json" in error_of(r, 415) and "access-control-allow-origin" not in r.headers
    # DNS rebinding: a page on another name that resolves to 127.0.0.1.
    assert "localhost only" in error_of(api.http.get("/v1/models", headers={"host": "evil.example:8000"}), 403)
    assert api.http.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200
    # Every error is OpenAI's JSON, FastAPI's own included.
    assert error_of(api.http.get("/nope"), 404) == "no such route"
    assert error_of(api.http.put("/health", json={}), 405)
    bare.close()


def _raw(api, head: bytes) -> socket.socket:
    host, port = api.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\n" + head + b"\r\n")
    return s


def _answer(s: socket.socket) -> bytes:
    """The whole answer: the head, then its Content-Length of body (they may come in separate segments)."""
    got = b""
    try:
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < _length(got):
            part = s.recv(65536)
            if not part:
                break
            got += part
    except ConnectionResetError:  # the server closes an unread upload; what arrived before counts
        pass
    return got


def _length(got: bytes) -> int:
    for line in got.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_over_the_limit_gets_413_without_being_read(api):
    # A length past the limit: answered from the header alone, not one byte of the body sent.
    with _raw(api, b"Content-Length: 1073741824\r\n") as s:
        answer = _answer(s)
    assert answer.split(b"\r\n")[0].endswith(b"413 Request Entity Too Large") and b"--max-body-mb 1" in answer
    # No length (chunked): answered once the bytes read pass the limit; the rest is never read.
    sent, chunk = 0, b"x" * 65536
    with _raw(api, b"Transfer-Encoding: chunked\r\n") as s:
        while sent < 64 * 2**20 and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = _answer(s)
    assert b" 413 " in answer.split(b"\r\n")[0] and b"--max-body-mb 1" in answer
    assert LIMIT_MB * 2**20 < sent < 32 * 2**20


def test_every_listening_socket_is_on_loopback(api):
    processes = [psutil.Process(api.proc.pid), *psutil.Process(api.proc.pid).children(recursive=True)]
    listening = [(p.pid, c.laddr.ip) for p in processes for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    workers = set(api.health().json()["workers"])
    assert {pid for pid, _ in listening} >= {api.proc.pid, *workers}  # HTTP, the store, the ranks' gloo sockets
    assert all(ip in ("127.0.0.1", "::1") for _, ip in listening), listening


def test_metrics_count_every_answer_once(api):
    before = api.answers()
    answers = [
        api.post(prompt=P1, seed=1, num_inference_steps=2).status_code,                           # ok
        api.post(prompt=P1, num_inference_steps=0).status_code,                                   # rejected
        api.http.post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"}).status_code,
        api.http.post("/v1/images/generations", content=b"x", headers={"content-type": "text/plain"}).status_code,
        httpx.post(f"{api.url}/v1/images/generations", json={"prompt": P1}).status_code,           # no key
    ]
    with _raw(api, b"Content-Length: %d\r\n" % (LIMIT_MB * 2**20 + 1)) as s:
        answers.append(int(s.recv(65536).split(b" ")[1]))
    assert answers == [200, 400, 400, 415, 401, 413]
    assert api.answers() == before + len(answers)
    assert api.metric('shardiff_requests_total{outcome="too_large"}') == 3  # with the two of the test before


def test_a_stopped_rank_is_noticed_by_its_heartbeat_and_the_group_comes_back(api):
    health = api.health().json()
    rank1 = health["workers"][1]
    os.kill(rank1, signal.SIGSTOP)  # hung: its process and sockets stay, it says nothing
    try:
        seen: list = []
        wait_for(lambda: seen.append(api.health()) or seen[-1].status_code == 503, what="/health 503")
        # No request was running: the heartbeat noticed it, nothing else could have.
        assert "rank 1 stopped answering" in seen[-1].json()["last_failure"]
        after = api.wait_ready(240)
    finally:
        if psutil.pid_exists(rank1):
            os.kill(rank1, signal.SIGCONT)
    assert after["generation"] == health["generation"] + 1 and rank1 not in after["workers"]
    assert api.post(prompt=P1, seed=1, num_inference_steps=2).status_code == 200
    assert api.metric('shardiff_failures_total{cause="unresponsive"}') == 1


def test_sigterm_answers_503_while_draining_then_exits(api):
    results: dict = {}

    def long():
        results["long"] = api.http.post("/v1/images/generations", json={"prompt": P1, "num_inference_steps": LONG})

    t = threading.Thread(target=long)
    t.start()
    wait_for(lambda: api.health().json()["running"] == 1, what="the long request to run")
    api.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: api.health().json()["status"] == "stopping", what="the server to drain")
    assert "shutting down" in error_of(api.post(prompt=P1), 503)  # the listener is still open
    t.join(120)
    assert "shutting down" in error_of(results["long"], 503)  # past --drain-timeout: stopped, answered
    assert api.proc.wait(60) == 0, api.text()
