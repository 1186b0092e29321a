"""Running a controller (and its HTTP app) on an event loop: in the foreground for `python -m
engine.serve`, on a background thread for `serve.start`.

Shutdown (SIGTERM, SIGINT, or closing the in-process server): stop admitting (new requests get 503,
the listener stays open meanwhile), answer the queued ones 503, let the running one finish for up to
--drain-timeout seconds (then stop it at its next step and answer it 503), and only then close the
listener — every request in flight has had its JSON answer (or a streamed request its last event) —
and tell the workers to exit, killing any that do not. A second signal skips the wait. The exit
status is 0 after a shutdown, 1 when the server gave up (its group could not be started or
restarted), with the cause on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import threading

import uvicorn

from .app import build_app
from .controller import Controller

CLOSE_GRACE_S = 5.0
"""Once every request is answered, how long the listener waits for the answers to be written."""


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ours stops the controller first, and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts (port 0: a free port, reported)."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


async def serve(controller: Controller, sock: socket.socket | None, *, host: str = "127.0.0.1",
                started=None) -> int:
    """Run `controller` (and HTTP on `sock`, listening on `host`) until shutdown or failure; the exit status."""
    await controller.start()
    server = None
    tasks = {asyncio.ensure_future(controller.stopping.wait())}
    if sock is not None:
        app = build_app(controller, host=host)
        server = _Uvicorn(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=CLOSE_GRACE_S))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        tasks.add(serving)
    if started is not None:
        started(server)
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    await controller.drain()  # every request answered, the listener still open (503 to new ones)
    if server is not None:
        server.should_exit = True
        await serving
        app.state.pool.shutdown(wait=False)
    await controller.close()
    return 1 if controller.failure else 0


def run_foreground(controller: Controller, sock: socket.socket) -> int:
    """`python -m engine.serve`: serve on `sock` until SIGTERM / SIGINT; the exit status."""
    loop = asyncio.new_event_loop()
    state = {"server": None, "signals": 0}

    def on_signal(sig, frame):
        state["signals"] += 1
        loop.call_soon_threadsafe(_shutdown, controller, state, sig)

    def started(server):
        state["server"] = server
        address = sock.getsockname()
        options = controller.options
        groups = f"{options.replicas} groups of " if options.replicas > 1 else ""
        controller.log(f"listening on http://{address[0]}:{address[1]} (model {controller.config.model}, "
                       f"{groups}{options.world_size} rank(s)); /health turns 200 when ready")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return loop.run_until_complete(serve(controller, sock, host=sock.getsockname()[0], started=started))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        loop.close()


def _shutdown(controller: Controller, state: dict, sig: int) -> None:
    if state["signals"] == 1:
        controller.log(f"{signal.Signals(sig).name}: shutting down (the running request may finish; "
                       "a second signal stops it)")
        controller.begin_shutdown()
        return
    controller.options = dataclasses.replace(controller.options, drain_timeout_s=0.0)
    for job in controller.running_jobs():
        controller.cancel(job.id)
    if state["server"] is not None:
        state["server"].force_exit = True


class Background:
    """A controller on its own event-loop thread (serve.start): `call(coro)` from any thread."""

    def __init__(self, controller: Controller, host: str | None, port: int | None):
        self.controller = controller
        self.host = host or "127.0.0.1"
        self.sock = bind(self.host, port) if port is not None else None
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.status: int | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardiff-serve", daemon=True)
        self._thread.start()
        self._started.wait()

    @property
    def url(self) -> str | None:
        if self.sock is None:
            return None
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def started(server):
            self.server = server
            self._started.set()

        try:
            self.status = self.loop.run_until_complete(serve(self.controller, self.sock, host=self.host,
                                                             started=started))
        finally:
            self._started.set()
            self.loop.close()

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> int | None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have just ended (the server gave up)
                self.loop.call_soon_threadsafe(self.controller.begin_shutdown)
            self._thread.join()
        return self.status
