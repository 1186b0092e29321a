"""One rank of the served model: the engine's own SPMD API, fed over the controller's channel.

Each worker joins the group with torch's env:// rendezvous against the TCPStore that the controller
hosts (TORCHELASTIC_USE_AGENT_STORE, as under torchrun's elastic agent), builds the `Engine`, says
Ready, and then waits on its socket — never inside a collective, so an idle server has no NCCL or
gloo timeout to hit and no busy broadcast loop. Every rank receives the same Run and calls
`Engine.generate_batch` with it; the first rank sends the images back.

Two threads: the channel thread reads the socket (a Cancel must be seen while the main thread is
generating) and the main thread generates. A cancel sets the `AgreedStop` flag; the ranks stop at
the same step. Anything that goes wrong mid-request (an exception, out of memory) is reported as
Failed and the process exits: the controller restarts the whole group. If the controller goes away
the worker exits too (its socket closes; and on Linux the kernel sends SIGKILL when the parent dies).
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

from .protocol import Cancel, Exit, Failed, Finished, Hello, Ready, Run, WorkerSpec

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
    import torch

    torch.set_num_threads(spec.threads)
    conn = Client(spec.controller, authkey=spec.authkey)
    conn.send(Hello(rank, os.getpid()))
    Worker(rank, spec, conn).serve()


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

    def send(self, msg) -> None:
        self.conn.send(msg)

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
        from engine.runtime.stop import AgreedStop
        from engine.request_check import available_bytes

        engine = Engine(self.spec.config)
        engine.pipe.set_progress_bar_config(disable=True)  # one line per request is the controller's job
        self.stop = AgreedStop(engine, timedelta(seconds=engine.config.timeout_s))
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
        start = time.perf_counter()
        outcome, results, message = "done", None, ""
        try:
            results = engine.generate_batch(job.requests, output_type=job.output_type, on_step=self.stop)
        except Stopped as e:
            outcome, message = "stopped", str(e)
        except UserError as e:
            # Every rank saw this mistake (it came out of the engine's agreement): the group is intact.
            outcome, message = "rejected", str(e)
        except torch.OutOfMemoryError as e:
            self.fail("out_of_memory", f"rank {self.rank} ran out of memory: {_first_line(e)}", job_id=job.job_id)
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            self.fail(*_describe(e, self.rank, "during the request"), job_id=job.job_id)
        self.stop.settle()
        with self.lock:
            self.current = None
        self.send(Finished(self.rank, job.job_id, outcome, results=results, message=message,
                           memory_bytes=self.memory(), seconds=time.perf_counter() - start))


def _describe(e: BaseException, rank: int, when: str) -> tuple[str, str]:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return "out_of_memory", f"rank {rank} ran out of memory {when}: {_first_line(e)}"
    return "exception", f"rank {rank} raised {type(e).__name__} {when}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the controller dies, however it dies (no orphans)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
