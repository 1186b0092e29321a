"""Admission: one bounded FIFO of jobs for every model group, one running at a time per group.

A full queue refuses at once (the HTTP layer answers 429 with Retry-After: the expected wait, from
the mean service time of recent requests) instead of letting latency grow without bound. Queued jobs
leave the queue when they run, when their deadline passes or when they are cancelled; a job is only
ever in one place (queue or running), so an id is answered exactly once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"the queue is full ({depth} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    id: str
    requests: list
    """Complete GenerateRequests (every rank runs exactly these)."""
    layout: object
    """The ParallelConfig the engine will use for them (engine/request_check.check_requests)."""
    future: asyncio.Future
    output_type: str = "pil"
    deadline: float | None = None
    """time.monotonic() past which the job is answered 504 and stopped."""
    internal: bool = False
    """A warm-up job (not a user's request: no metrics, not in the queue's accounting)."""
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    state: str = "queued"
    """queued → running → done; or cancelled / expired / failed."""
    group: object = None
    """The model group it runs on (engine/serve/group.py), once dispatched."""
    generation: int = -1
    """The generation of that group's ranks it was sent to."""
    timer: asyncio.TimerHandle | None = None
    encoding: object = None
    """How the first rank encodes the images (engine/serve/encode.Encoding); None: PIL images."""
    previews: object = None
    """Partial images to stream (engine/serve/preview.Previews), or None."""
    on_partial: object = None
    """on_partial(index, b64): called on the loop thread for each partial image."""
    lora: dict = field(default_factory=dict)
    """The named LoRA adapters to run with: name → scale ({}: none, the plain --lora ones only)."""
    passed: int = 0
    """How often a younger job ran first, sparing a LoRA switch (engine/serve/dispatch.py bounds it)."""

    @property
    def lora_key(self) -> tuple:
        """The adapters as the groups' `fused` says them: ((name, scale), …) sorted."""
        return tuple(sorted(self.lora.items()))


class AdmissionQueue:
    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"--max-queue must be ≥ 0, got {max_queue}")
        self.max_queue = max_queue
        self._queue: OrderedDict[str, Job] = OrderedDict()
        self._service: deque[float] = deque(maxlen=32)
        """Seconds of the last requests' generations, for Retry-After."""

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._queue

    def push(self, job: Job) -> None:
        """Queue `job` (FIFO) or raise QueueFull; warm-up jobs go first and are never refused."""
        if job.internal:
            self._queue[job.id] = job
            self._queue.move_to_end(job.id, last=False)
        else:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue[job.id] = job

    def remove(self, job_id: str) -> Job | None:
        return self._queue.pop(job_id, None)

    def jobs(self) -> list[Job]:
        """The queued jobs, oldest first."""
        return list(self._queue.values())

    def peek(self) -> Job | None:
        return next(iter(self._queue.values()), None)

    def pop(self) -> Job:
        _, job = self._queue.popitem(last=False)
        return job

    def drain(self) -> list[Job]:
        jobs = list(self._queue.values())
        self._queue.clear()
        return jobs

    def record(self, seconds: float) -> None:
        self._service.append(seconds)

    def retry_after(self) -> int:
        """Whole seconds until a place is likely free: a place opens when the running job ends and the
        first queued one starts, so the mean recent service time; 1 s when nothing was measured yet."""
        if not self._service:
            return 1
        return max(1, math.ceil(sum(self._service) / len(self._service)))


@dataclass
class JobResult:
    id: str
    results: list
    """GenerateResults in request order (each with its image and params)."""
    queue_s: float
    generate_s: float
    """generate_batch on the first rank."""
    total_s: float
    encode_s: float = 0.0
    """Encoding the images on the first rank (HTTP answers), after generate_batch."""
    lora: dict = field(default_factory=dict)
    """The named adapters that ran: name → scale."""
    lora_s: float = 0.0
    """Switching the fused adapters before generate_batch (0: the group held them already)."""
    group: int = 0
    """The model group that ran it."""
