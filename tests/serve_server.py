"""`python -m engine.serve` run as a user runs it, for the tests: its own process group (a finalizer can
end every process of it), real HTTP on 127.0.0.1, the log in a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240


def env():
    out = dict(os.environ)
    out.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), out.get("PYTHONPATH", "")])
    out.pop("SHARDIFF_API_KEY", None)
    return out


class Server:
    def __init__(self, tmp: Path, *args: str, api_key: str | None = None):
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.serve", "--procs", "2", "--port", "0", *args],
            cwd=REPO, env=env(), stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the finalizer can end every process of it
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not (m := re.search(r"listening on (http://[\d.]+:\d+)", self.text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        self.url = m.group(1)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        self.wait_ready()

    def text(self) -> str:
        return self.log_path.read_text()

    def health(self) -> httpx.Response:
        return self.http.get("/health")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while (r := self.health()).status_code != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        return r.json()

    def post(self, **body) -> httpx.Response:
        return self.http.post("/v1/images/generations", json=body)

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def answers(self) -> float:
        """shardiff_requests_total summed over its outcomes."""
        text = self.http.get("/metrics").text
        return sum(float(v) for v in re.findall(r"^shardiff_requests_total\{[^}]*\} (\S+)$", text, re.M))

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def wait_for(predicate, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
