"""One rank of the served model: the engine's own SPMD API, fed over the controller's channel.

Each worker joins the group with torch's env:// rendezvous against the TCPStore that the controller
hosts (TORCHELASTIC_USE_AGENT_STORE, as under torchrun's elastic agent), builds the `Engine`, says
Ready, and then waits on its socket — never inside a collective, so an idle server has no NCCL or
gloo timeout to hit and no busy broadcast loop. Every rank receives the same Run and calls
`Engine.generate_batch` with it; the first rank sends the images back.

Three threads: the channel thread reads the socket (a Cancel must be seen while the main thread is
generating), the heartbeat thread says every `heartbeat_s` that the process is alive (a rank stopped
or hung stops saying it: the supervisor notices), and the main thread generates. A cancel sets the
`AgreedStop` flag; the ranks stop at the same step. A request the pipeline itself refuses on every
rank while preparing it is agreed on before the first collective (engine/runtime/gate.py) and
answered as a user error: the group goes on. Anything else that goes wrong mid-request (an exception,
out of memory) is reported as Failed and the process exits: the controller restarts the whole group.
If the controller goes away the worker exits too (its socket closes; and on Linux the kernel sends
SIGKILL when the parent dies).

The collective libraries' sockets (gloo, NCCL's bootstrap) bind the loopback interface: the group is
on this host, and nothing of it should be reachable from another.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

from .protocol import Cancel, Encoded, Exit, Failed, Finished, Heartbeat, Hello, Partial, Ready, Run, WorkerSpec

PR_SET_PDEATHSIG = 1


def main(local_rank: int, spec: WorkerSpec) -> None:
    """Entry point of a spawned worker (torch.multiprocessing passes the process index first)."""
    _die_with_parent()
    # The controller shuts the group down with Exit; a SIGINT from the terminal's Ctrl-C reaches the
    # whole process group at once, so the workers leave that to the controller.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank = local_rank
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(spec.world_size),
        LOCAL_WORLD_SIZE=str(spec.world_size), GROUP_RANK="0", ROLE_RANK=str(rank),
        MASTER_ADDR=spec.store[0], MASTER_PORT=str(spec.store[1]),
        # All ranks connect to the controller's store as clients (the elastic agent's form).
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT=str(spec.generation),
    )
    if spec.devices is not None:
        # Before CUDA is initialised (torch reads it then): this group sees its own GPUs only.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec.devices)
    if spec.loopback:
        interface = _loopback_interface()
        if interface is not None:  # an operator's own choice (the variables set already) is kept
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    import torch

    torch.set_num_threads(spec.threads)
    conn = Client(spec.controller, authkey=spec.authkey)
    worker = Worker(rank, spec, conn)
    worker.send(Hello(rank, os.getpid()))
    threading.Thread(target=worker.heartbeat, name="shardiff-heartbeat", daemon=True).start()
    worker.serve()


class Worker:
    def __init__(self, rank: int, spec: WorkerSpec, conn):
        self.rank = rank
        self.spec = spec
        self.conn = conn
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.current: str | None = None
        self.cancelled: set[str] = set()
        self.stop = None
        self._send_lock = threading.Lock()
        """The main thread (results, partial images) and the heartbeat thread both send."""

    def send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def heartbeat(self) -> None:
        """The heartbeat thread: one small message every heartbeat_s while the process runs."""
        beat = Heartbeat(self.rank)
        while True:
            time.sleep(self.spec.heartbeat_s)
            try:
                self.send(beat)
            except (OSError, ValueError):  # the channel is closed: the process is on its way out
                return

    def fail(self, cause: str, message: str, *, user_error: bool = False, job_id: str | None = None) -> None:
        try:
            self.send(Failed(self.rank, cause, message, user_error=user_error, job_id=job_id))
            self.conn.close()
        finally:
            sys.stderr.flush()
            os._exit(2 if user_error else 1)

    def serve(self) -> None:
        from engine.runtime.distributed import UserError

        try:
            engine, ready = self.load()
        except UserError as e:
            self.fail("startup", str(e), user_error=True)
        except BaseException as e:  # noqa: BLE001 — reported to the controller, then this process ends
            traceback.print_exc()
            self.fail(*_describe(e, self.rank, "while loading"))
        threading.Thread(target=self.read_channel, name="shardiff-channel", daemon=True).start()
        self.send(ready)
        while True:
            msg = self.jobs.get()
            if isinstance(msg, Exit):
                break
            self.run(engine, msg)
        engine.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.conn.close()  # a normal return: multiprocessing's own clean-up runs

    def load(self):
        from engine.driver import Engine
        from engine.runtime.gate import PreparationGate
        from engine.runtime.stop import AgreedStop
        from engine.request_check import available_bytes

        engine = Engine(self.spec.config)
        engine.pipe.set_progress_bar_config(disable=True)  # one line per request is the controller's job
        self.stop = AgreedStop(engine, timedelta(seconds=engine.config.timeout_s))
        engine.gate = PreparationGate(engine, timedelta(seconds=engine.config.timeout_s))
        self.memory = lambda: available_bytes(engine.device, self.spec.world_size)
        return engine, Ready(self.rank, engine.parallel, engine.tp_note, self.memory(), str(engine.device),
                             str(engine.dtype).removeprefix("torch."))

    def read_channel(self) -> None:
        """The channel thread: jobs go to the main thread, a cancel flags the running job at once."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                # The controller is gone: nothing will ever ask for these results.
                os._exit(1)
            if isinstance(msg, Cancel):
                with self.lock:
                    if msg.job_id == self.current:
                        self.stop.request()
                    else:
                        self.cancelled.add(msg.job_id)
            else:
                self.jobs.put(msg)
                if isinstance(msg, Exit):
                    return

    def run(self, engine, job: Run) -> None:
        import torch

        from engine.runtime.distributed import UserError
        from engine.runtime.stop import Stopped

        with self.lock:
            self.stop.reset()
            self.current = job.job_id
            if job.job_id in self.cancelled:  # cancelled before it reached this rank: stops at once
                self.cancelled.discard(job.job_id)
                self.stop.request()
        from .encode import b64_image, bounded_params
        from .preview import StepHook

        first = job.requests[0]
        hook = StepHook(self.stop, job.previews, sends=self.rank == 0, size=(first.height, first.width),
                        send=lambda index, b64: self.send(Partial(self.rank, job.job_id, index, b64)),
                        decodes=lambda: engine.mesh.is_first or (engine.vae_split is not None
                                                                 and engine.mesh.coord("dp") == 0))
        outcome, results, message, encode_s, lora_s = "done", None, "", 0.0, 0.0
        if job.loras is not None and tuple(engine.loras.active) != tuple(job.loras):
            # Once per switch, never per request: the same Run on every rank, no collective.
            start = time.perf_counter()
            try:
                engine.set_loras(job.loras)
            except BaseException as e:  # noqa: BLE001 — checked at start-up; anything now breaks the group
                traceback.print_exc()
                self.fail(*_describe(e, self.rank, "while switching LoRAs"), job_id=job.job_id)
            lora_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            results = engine.generate_batch(job.requests, output_type=job.output_type, on_step=hook)
            seconds = time.perf_counter() - start
            if results is not None and job.encoding is not None:
                # Encoded here, on the rank that holds the images, not on the controller's event loop.
                results = [Encoded(b64_image(r.image, r.params, job.encoding), bounded_params(r.params), r.seconds)
                           for r in results]
                encode_s = time.perf_counter() - start - seconds
        except Stopped as e:
            outcome, message = "stopped", str(e)
        except UserError as e:
            # Every rank saw this mistake (it came out of the engine's agreement, or the pipeline refused
            # the request on every rank before its first collective): the group is intact.
            outcome, message = "rejected", str(e)
        except torch.OutOfMemoryError as e:
            self.fail("out_of_memory", f"rank {self.rank} ran out of memory: {_first_line(e)}", job_id=job.job_id)
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            self.fail(*_describe(e, self.rank, "during the request"), job_id=job.job_id)
        self.stop.settle()
        with self.lock:
            self.current = None
        if outcome != "done":
            seconds = time.perf_counter() - start
        self.send(Finished(self.rank, job.job_id, outcome, results=results, message=message,
                           memory_bytes=self.memory(), seconds=seconds, encode_seconds=encode_s,
                           lora_seconds=lora_s))


def _describe(e: BaseException, rank: int, when: str) -> tuple[str, str]:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return "out_of_memory", f"rank {rank} ran out of memory {when}: {_first_line(e)}"
    return "exception", f"rank {rank} raised {type(e).__name__} {when}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _loopback_interface() -> str | None:
    """The name of this host's loopback interface ("lo" on Linux), or None."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the controller dies, however it dies (no orphans)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
