"""The worker group's life: spawn one process per GPU, connect, watch, tear down, restart.

The controller never does GPU work: this thread starts the ranks with torch.multiprocessing (spawn),
hosts the TCPStore of their rendezvous (a fresh one per generation, the elastic agent's form: the
ranks connect to it as clients) and a listener that each rank dials back into. It then waits on every
rank's socket and process sentinel at once (multiprocessing.connection.wait): a message is handed to
the controller, a closed socket or an exited process is a failure of the whole group, and so is a rank
that sends nothing — not even its heartbeat — for `heartbeat_timeout_s` once the group serves (a
stopped or hung process: its sockets stay open and its process runs, so nothing else would tell).

Everything of the group listens on the loopback interface only: the rendezvous store (on a socket bound
here and handed to torch's TCPStore), the listener the ranks dial back into, and — through the ranks'
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (engine/serve/worker.py) — the collective libraries' sockets.

On a failure the group is torn down (the other ranks are killed: they may be blocked in a collective
with the dead one) after a short window that collects the other ranks' reports, so the cause names
the first failure, not its echoes. Then it is started again, after an exponential backoff, unless it
failed `max_restarts` times in a row without completing a request (or never came up at all): then
the supervisor gives up and the server exits non-zero with the cause.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait

from . import worker
from .protocol import Exit, Failed, Heartbeat, Hello, Ready, WorkerSpec

COLLECT_S = 0.5
"""After the first failure, how long the other ranks' reports are still collected."""
EXIT_GRACE_S = 10.0
"""How long workers get to leave after Exit before they are killed."""
HEARTBEAT_S = 1.0
"""Seconds between two heartbeats of a rank."""
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class GroupUp:
    generation: int
    ready: list
    """Every rank's Ready, in rank order."""
    pids: list


@dataclass(frozen=True)
class GroupMessage:
    generation: int
    message: object


@dataclass(frozen=True)
class GroupDown:
    generation: int
    cause: str
    """One line naming the failure (the first rank's report or death, then the others)."""
    kind: str
    """"rank_died", "out_of_memory", "exception", "unresponsive", "startup"."""
    restart_in: float | None
    """Seconds until the next start; None: no restart (gave up, or shutting down)."""
    user_error: bool = False


@dataclass
class _Group:
    generation: int
    spec: WorkerSpec
    context: object
    listener: socket.socket
    store: object
    conns: dict = field(default_factory=dict)
    """rank → its connection."""
    pids: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)
    """rank → time.monotonic() of its last message (heartbeats included)."""


class Supervisor:
    def __init__(self, *, config, world_size: int, threads: int, emit, max_restarts: int = 3,
                 backoff_s: float = 1.0, startup_timeout_s: float = 1800.0, heartbeat_timeout_s: float = 20.0,
                 devices: tuple[str, ...] | None = None, name: str = "shardiff-supervisor"):
        """`emit(event)` is called from the supervisor thread with GroupUp / GroupMessage / GroupDown.
        `devices`: the GPUs of this group (CUDA_VISIBLE_DEVICES of its ranks), None: every visible one."""
        self.config = config
        self.devices = devices
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.world_size = world_size
        self.threads = threads
        self.emit = emit
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.startup_timeout_s = startup_timeout_s
        self.authkey = secrets.token_bytes(32)
        self.generation = 0
        self.failures_in_row = 0
        self.ever_up = False
        self._group: _Group | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._broken: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # ------------------------------------------------------------------ the controller's side

    def start(self) -> None:
        self._thread.start()

    def send(self, msg, generation: int) -> bool:
        """Send `msg` to every rank of `generation`; False if that group is gone (its failure is on its way)."""
        with self._send_lock:
            group = self._group
            if group is None or group.generation != generation or len(group.conns) < self.world_size:
                return False
            try:
                for rank in range(self.world_size):
                    group.conns[rank].send(msg)
            except OSError:
                return False
        return True

    def declare_broken(self, reason: str) -> None:
        """The controller gave up on the running group (it did not stop when asked): restart it."""
        self._broken = reason
        if self._thread.is_alive():
            os.write(self._wake_w, b"b")

    def request_succeeded(self) -> None:
        """A request completed: the group is healthy, the failure count starts again."""
        self.failures_in_row = 0

    def stop(self, timeout: float = EXIT_GRACE_S) -> None:
        """Ask every worker to leave, kill those that do not, and end the supervisor thread (blocking)."""
        if self._stopping.is_set() or not self._thread.is_alive():
            self._stopping.set()
            self._thread.join(timeout + 5)
            return
        self._stopping.set()
        os.write(self._wake_w, b"s")
        self._thread.join(timeout + 5)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    # ------------------------------------------------------------------ the supervisor thread

    def _main(self) -> None:
        try:
            self._generations()
        except BaseException as e:  # noqa: BLE001 — the server must hear of it, not wait forever
            if self._group is not None:
                self._teardown(self._group)
            message = " ".join(str(e).split())
            if "bootstrapping phase" in message:
                message = ("the workers are spawned, which imports the caller's main module again: call "
                           "serve.start() under `if __name__ == \"__main__\":`")
            self.emit(GroupDown(self.generation, f"the supervisor failed: {type(e).__name__}: {message}",
                                "startup", None))
        finally:
            self._stopping.set()

    def _generations(self) -> None:
        while not self._stopping.is_set():
            group = self._spawn()
            cause, kind, user_error = self._connect(group)
            if cause is None:
                self.ever_up = True
                self.emit(GroupUp(group.generation, [r for _, r in sorted(self._ready.items())],
                                  [group.pids[r] for r in range(self.world_size)]))
                cause, kind, user_error = self._watch(group)
            if self._stopping.is_set():
                self._shutdown(group)
                break
            self._teardown(group)
            self.failures_in_row += 1
            give_up = user_error or not self.ever_up or self.failures_in_row > self.max_restarts
            if give_up and self.ever_up and not user_error:
                n = self.failures_in_row
                cause = f"{cause} (the group failed {n} time{'s' if n > 1 else ''} in a row; giving up)"
            delay = None if give_up else min(self.backoff_s * 2 ** (self.failures_in_row - 1), 60.0)
            self.emit(GroupDown(group.generation, cause, kind, delay, user_error=user_error))
            if give_up:
                return
            if self._sleep(delay):
                return
            self.generation += 1

    def _sleep(self, seconds: float) -> bool:
        """Back off; True if the server is stopping meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if wait([self._wake_r], timeout=end - time.monotonic()):
                os.read(self._wake_r, 64)
            if self._stopping.is_set():
                return True
        return False

    def _spawn(self) -> _Group:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        host = LOOPBACK
        # TCPStore's own server listens on every interface; on a socket bound here it listens on loopback
        # only (the store takes the descriptor over and closes it).
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.config.timeout_s),
                              master_listen_fd=socket.create_server((host, 0)).detach())
        listener = socket.create_server((host, 0))
        spec = WorkerSpec(config=self.config, world_size=self.world_size, controller=listener.getsockname()[:2],
                          authkey=self.authkey, store=(host, store.port), generation=self.generation,
                          threads=self.threads, heartbeat_s=min(HEARTBEAT_S, self.heartbeat_timeout_s / 4),
                          loopback=True, devices=self.devices)
        self._ready: dict[int, Ready] = {}
        self._broken = None
        # Spawned from this thread, which lives as long as the workers: their parent-death signal
        # (worker._die_with_parent) follows the thread that started them.
        context = mp.start_processes(worker.main, args=(spec,), nprocs=self.world_size, join=False,
                                     start_method="spawn")
        group = _Group(self.generation, spec, context, listener, store)
        with self._send_lock:
            self._group = group
        return group

    def _connect(self, group: _Group):
        """Accept every rank's connection and wait for every Ready; (None, …) or the failure."""
        deadline = time.monotonic() + self.startup_timeout_s
        sentinels = {p.sentinel: r for r, p in enumerate(group.context.processes)}
        while len(self._ready) < self.world_size:
            conns = dict(group.conns)
            waiting = [group.listener, *conns.values(), *sentinels, self._wake_r]
            ready = wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if self._stopping.is_set():
                return "stopping", "startup", False
            if not ready:
                return f"the workers did not become ready in {self.startup_timeout_s:.0f} s", "startup", False
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 64)
                elif obj is group.listener:
                    self._accept(group)
                else:
                    failure = self._handle(group, obj, sentinels, conns)
                    if failure is not None:
                        return self._collect(group, failure)
        return None, "", False

    def _accept(self, group: _Group) -> None:
        """One rank dials in: the multiprocessing handshake with this server's key, then its Hello."""
        sock, _ = group.listener.accept()
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            hello = conn.recv()
        except (OSError, EOFError, AuthenticationError):
            conn.close()
            return
        assert isinstance(hello, Hello), hello
        with self._send_lock:
            group.conns[hello.rank] = conn
            group.pids[hello.rank] = hello.pid
        group.seen[hello.rank] = time.monotonic()

    def _watch(self, group: _Group):
        sentinels = {p.sentinel: r for r, p in enumerate(group.context.processes)}
        now = time.monotonic()
        group.seen = dict.fromkeys(range(self.world_size), now)  # loading is the startup timeout's
        while True:
            conns = dict(group.conns)
            quiet = min(group.seen, key=group.seen.get)
            left = group.seen[quiet] + self.heartbeat_timeout_s - time.monotonic()
            if left <= 0:
                cause = (f"rank {quiet} stopped answering (no message or heartbeat for {self.heartbeat_timeout_s:g} s: "
                         "stopped or hung)")
                return self._collect(group, (cause, "unresponsive", False))
            ready = wait([*conns.values(), *sentinels, self._wake_r], timeout=left)
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 64)
                    if self._stopping.is_set():
                        return "stopping", "stopping", False
                    if self._broken is not None:
                        return self._collect(group, (self._broken, "unresponsive", False))
                    continue
                failure = self._handle(group, obj, sentinels, conns)
                if failure is not None:
                    return self._collect(group, failure)

    def _handle(self, group: _Group, obj, sentinels: dict, conns: dict):
        """One ready socket or sentinel; a (cause, kind, user_error) failure or None."""
        if obj in sentinels:
            rank = sentinels[obj]
            conn = conns.get(rank)
            # What it said before it went (its Failed report) is the better cause than its exit code.
            while conn is not None and conn.poll():
                failure = self._receive(group, rank, conn)
                if failure is not None:
                    return failure
            proc = group.context.processes[rank]
            proc.join(10.0)  # its sentinel is ready once its files are closed, a moment before it is reaped
            return _death(rank, proc.exitcode), "rank_died", False
        rank = next(r for r, c in conns.items() if c is obj)
        return self._receive(group, rank, obj)

    def _receive(self, group: _Group, rank: int, conn):
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            proc = group.context.processes[rank]
            proc.join(10.0)  # its socket closes a moment before it can be reaped
            return _death(rank, proc.exitcode), "rank_died", False
        group.seen[rank] = time.monotonic()
        if isinstance(msg, Heartbeat):
            return None
        if isinstance(msg, Failed):
            return msg.message, msg.cause, msg.user_error
        if isinstance(msg, Ready):
            self._ready[msg.rank] = msg
        else:
            self.emit(GroupMessage(group.generation, msg))
        return None

    def _collect(self, group: _Group, first):
        """The first failure, with what the other ranks report in the next COLLECT_S (their echoes)."""
        cause, kind, user_error = first
        if user_error:
            return cause, kind, user_error  # every rank says the same; one line is enough
        seen = {cause}
        end = time.monotonic() + COLLECT_S
        conns = dict(group.conns)
        while time.monotonic() < end and conns:
            for obj in wait(list(conns.values()), timeout=max(0.0, end - time.monotonic())):
                rank = next(r for r, c in conns.items() if c is obj)
                try:
                    msg = obj.recv()
                except (EOFError, OSError):
                    del conns[rank]
                    continue
                if isinstance(msg, Failed) and msg.message not in seen:
                    seen.add(msg.message)
                    cause += f"; then {msg.message}"
        return cause, kind, user_error

    def _teardown(self, group: _Group) -> None:
        with self._send_lock:
            self._group = None
        for p in group.context.processes:
            if p.is_alive():
                p.kill()
        for p in group.context.processes:
            p.join(EXIT_GRACE_S)
        self._close(group)

    def _shutdown(self, group: _Group) -> None:
        with self._send_lock:
            self._group = None
            for conn in group.conns.values():
                try:
                    conn.send(Exit())
                except OSError:
                    pass
        end = time.monotonic() + EXIT_GRACE_S
        for p in group.context.processes:
            p.join(max(0.0, end - time.monotonic()))
        for p in group.context.processes:
            if p.is_alive():
                p.kill()
                p.join(EXIT_GRACE_S)
        self._close(group)

    def _close(self, group: _Group) -> None:
        for conn in group.conns.values():
            conn.close()
        group.listener.close()
        del group.store


def _death(rank: int, exitcode: int | None) -> str:
    if exitcode is None:
        return f"rank {rank} closed its channel and is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} died (killed by {name})"
    return f"rank {rank} died (exit code {exitcode})"
