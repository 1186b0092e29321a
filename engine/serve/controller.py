"""The controller: completes and checks each request, queues it, runs it on the worker group, answers.

Runs on one asyncio event loop (uvicorn's, or a background thread's for `serve.start`) and does no
GPU work. For every request it decides everything before any rank sees it — the request id, the
image size (the model's default when none is given), the layout (engine/request_check.check_requests,
the engine's own rule) — so that every rank runs the identical request and a user mistake is a 400
that costs no rank anything. One request runs at a time on the group; the rest wait in a bounded FIFO.

Deadlines: a request past its deadline is answered 504 at once; if it was running, the ranks are told
to stop (they stop together at the next step, engine/runtime/stop.py) and the group takes the next
request as soon as they have. Cancels work the same way. A group that does not stop within
`stop_grace_s` of being told is declared broken and restarted.

Failures: the supervisor reports a group that lost a rank (death, out of memory, exception, a rank
that stopped answering); the running request gets a 500 naming the cause, queued requests stay queued
and run after the restart. A request that the ranks refuse while preparing it (the pipeline's own
checks, on every rank before the first collective: engine/runtime/gate.py) is a 400 and the group
goes on.

Bounds: every request is checked against the operator's limits (steps, prompt length: engine/limits.py)
and the served model's (its tokenizers' longest text) before it is queued. Every answer of a job is
counted once in `shardiff_requests_total{outcome}`, by the error class that answered it (or "ok").
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch

from engine.limits import check_limits, model_limits
from engine.config import GenerateRequest
from engine.loading import resolve_model
from engine.loading.pipeline import stand_in_processors
from engine.loading.processors import note as processor_note
from engine.pipelines import max_input_images
from engine.request_check import Target, check_requests
from engine.validation import resolve_size

from .admission import AdmissionQueue, Job, QueueFull
from .errors import (  # noqa: F401 — the error classes are the controller's API too
    BadRequest, Cancelled, Conflict, DeadlineExceeded, Forbidden, NotFound, PayloadTooLarge, ServeError,
    TooManyRequests, Unauthorized, Unavailable, UnsupportedMediaType, WorkerFailure, check_request_id, clean,
)
from .metrics import Metrics
from .options import ServeOptions
from .protocol import Cancel, Finished, Partial, Run
from .supervisor import GroupDown, GroupMessage, GroupUp, Supervisor

WARMUP_STEPS = 3
"""Denoising steps of a warm-up request: the compile happens on the first call; CUDA graphs capture
on the third call of a shape (after two eager warm-up calls)."""




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


class Controller:
    def __init__(self, config, options: ServeOptions, *, log=None):
        self.config = config
        self.options = options
        self.log = log or _log
        # Configs only (no weights): the model's sizes and family, for every request's checks.
        model = resolve_model(config.model)
        self.info, self.family = model.info, model.family
        self.max_input_images = max_input_images(self.family, self.info.pipeline_class)
        """The most reference images the model's pipelines take (a request with more: 400 at once)."""
        stand_ins = stand_in_processors(model)
        if stand_ins:
            self.log(processor_note(stand_ins))
        self.model_limits = model_limits(model)
        if options.world_size < 1:
            raise ValueError(f"the model group needs at least one rank, got {options.world_size}")
        preflight(config, self.info, self.family)
        for width, height in options.warmup_sizes or ():
            try:  # what can be checked before any rank exists; the rest when the group is up
                resolve_size(GenerateRequest(prompt="warm-up", height=height, width=width), self.info)
            except ValueError as e:
                raise ValueError(f"--warmup-sizes {width}x{height}: {e}") from None
        self.metrics = Metrics()
        self.started = time.time()
        self.queue: AdmissionQueue | None = None
        self.state = "starting"
        """starting → (warming →) ready; restarting → (warming →) ready; stopping; failed."""
        self.failure: str | None = None
        """Why the server gave up (it then exits non-zero)."""
        self.last_failure: str | None = None
        """The cause of the group's last failure (shown by /health until the group is ready again)."""
        self.target: Target | None = None
        self.generation = -1
        self.pids: list[int] = []
        self.memory: dict[int, int] = {}
        self.running: Job | None = None
        self.jobs: dict[str, Job] = {}
        """Every job queued or running, by id."""
        self.ever_ready = False
        self.stopping: asyncio.Event | None = None
        """Set when the server should stop (a shutdown was asked for, or it gave up)."""
        self.done: asyncio.Event | None = None
        """Set when it has stopped: workers gone."""
        self.supervisor = Supervisor(
            config=config, world_size=options.world_size, threads=options.threads, emit=self._emit,
            max_restarts=options.max_restarts, backoff_s=options.restart_backoff_s,
            heartbeat_timeout_s=options.heartbeat_timeout_s,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue = AdmissionQueue(self.options.max_queue)
        self.stopping = asyncio.Event()
        self.done = asyncio.Event()
        self.supervisor.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the group is warm (or the server failed: ServeError)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.state != "ready":
            if self.state in ("failed", "stopping"):
                raise Unavailable(self.failure or "the server is stopping")
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"the server did not become ready in {timeout:.0f} s (state: {self.state})")
            await asyncio.sleep(0.05)

    def begin_shutdown(self) -> None:
        """Stop admitting; answer the queued requests 503; let the running one finish (see close)."""
        if self.state in ("stopping", "failed"):
            return
        self.state = "stopping"
        self.stopping.set()
        self.metrics.ready.set(0)
        for job in self.queue.drain():
            self._fail(job, Unavailable("the server is shutting down"), "shutdown")
        self._gauges()

    async def close(self) -> None:
        """Shut down: drain (below), then the workers are told to exit and killed if they do not. Idempotent."""
        if self.done.is_set():
            return
        await self.drain()
        await asyncio.get_running_loop().run_in_executor(None, self.supervisor.stop)
        if self.running is not None:
            self._fail(self.running, Unavailable("the server is shutting down"), "shutdown")
            self.running = None
        self.done.set()

    async def drain(self) -> None:
        """Stop admitting, answer the queued requests 503; the running request has drain_timeout_s to
        finish, then it is stopped and answered 503 (its ranks get up to 10 s more to stop)."""
        self.begin_shutdown()
        job = self.running
        if job is not None and not job.internal:
            end = time.monotonic() + self.options.drain_timeout_s
            while self.running is job and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.running is job:
                self.cancel(job.id, Unavailable("the server is shutting down"))
                end = time.monotonic() + min(self.options.stop_grace_s, 10.0)
                while self.running is job and time.monotonic() < end:
                    await asyncio.sleep(0.05)

    def health(self) -> dict:
        target = self.target
        return {
            "status": self.state,
            "model": self.config.model,
            "layout": target.parallel.describe() if target else None,
            "world_size": self.options.world_size,
            "generation": self.generation,
            "workers": list(self.pids),
            "queue": len(self.queue) if self.queue is not None else 0,
            "running": int(self.running is not None and not self.running.internal),
            **({"error": clean(self.failure)} if self.failure else {}),
            **({"last_failure": clean(self.last_failure)} if self.last_failure and self.state != "ready" else {}),
        }

    # ------------------------------------------------------------------ requests

    @staticmethod
    def new_id() -> str:
        return f"img-{uuid.uuid4().hex}"

    def admit(self, requests: list, *, request_id: str | None = None, timeout: float | None = None,
              output_type: str = "pil", encoding=None, previews=None, on_partial=None) -> Job:
        """Check, complete and queue `requests` (one job); ServeError when refused (counted once under
        its outcome). `encoding`: the first rank sends encoded image files (engine/serve/encode.py);
        `previews` + `on_partial(index, b64)`: partial images (engine/serve/preview.py). Loop thread only."""
        try:
            return self._admit(requests, request_id, timeout, output_type, encoding, previews, on_partial)
        except ServeError as e:
            self.metrics.requests.labels(e.outcome).inc()
            raise

    def _admit(self, requests, request_id, timeout, output_type, encoding, previews, on_partial) -> Job:
        if self.state in ("stopping", "failed"):
            raise Unavailable(clean(self.failure) if self.failure else "the server is shutting down")
        job_id = self.new_id() if request_id is None else check_request_id(request_id)
        for request in requests:
            try:
                check_limits(request, self.options.limits, self.model_limits, model_name=self.config.model)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        if job_id in self.jobs:
            raise Conflict(f"request id {job_id!r} is already queued or running; ids must be unique")
        if not requests:
            raise BadRequest("no request: give a prompt")
        limit = self.options.request_timeout_s
        if timeout is not None:
            if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
                raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
            limit = min(limit, float(timeout))
        layout = None
        if self.target is not None:
            requests, layout = self._complete(requests)
        job = Job(job_id, requests, layout, self.loop.create_future(), output_type=output_type,
                  deadline=time.monotonic() + limit, encoding=encoding, previews=previews, on_partial=on_partial)
        try:
            self.queue.push(job)
        except QueueFull as e:
            raise TooManyRequests(str(e), retry_after=e.retry_after_s) from None
        job.future.add_done_callback(lambda future: self._count(job, future))
        self.jobs[job_id] = job
        job.timer = self.loop.call_at(self.loop.time() + limit, self._expire, job)
        self._gauges()
        self._kick()
        return job

    async def result(self, job: Job) -> JobResult:
        """The job's answer; if the caller goes away (its task is cancelled) the job is cancelled."""
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.cancel(job.id)
            raise

    async def generate(self, requests: list, **kwargs) -> JobResult:
        return await self.result(self.admit(requests, **kwargs))

    def cancel(self, job_id: str, error: ServeError | None = None) -> str | None:
        """Cancel a queued or running job: "cancelled" (it was queued), "stopping" (it runs and stops
        at the next step on every rank), None (no such job)."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        error = error or Cancelled(f"request {job_id} was cancelled")
        if job.state == "queued":
            self.queue.remove(job_id)
            self._fail(job, error, "cancelled")
            self._gauges()
            return "cancelled"
        self._stop_running(job, error, "cancelled")
        return "stopping"

    def _count(self, job: Job, future: asyncio.Future) -> None:
        """A user job's answer, counted once by its outcome (a done-callback of its future)."""
        if job.internal or future.cancelled():
            return
        error = future.exception()
        self.metrics.requests.labels("ok" if error is None else getattr(error, "outcome", "exception")).inc()

    def _complete(self, requests: list):
        """(requests with their size filled in, layout); BadRequest with the CLI's message. The request's one
        check in this process (each rank checks it once more, against what it holds)."""
        try:
            batch = check_requests(requests, self.target)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        done = [dataclasses.replace(r, height=c.height, width=c.width) for r, c in zip(requests, batch.requests)]
        return done, batch.layout

    # ------------------------------------------------------------------ running

    def _kick(self) -> None:
        """Start the next job if the group is free and ready for it."""
        while self.running is None and self.state in ("ready", "warming") and len(self.queue):
            job = self.queue.peek()
            if self.state == "warming" and not job.internal:
                return
            self.queue.pop()
            if job.layout is None:  # admitted before the group first came up: checked now
                try:
                    job.requests, job.layout = self._complete(job.requests)
                except BadRequest as e:
                    self._fail(job, e, None)
                    continue
            job.state, job.started, job.generation = "running", time.monotonic(), self.generation
            if not job.internal:
                self.metrics.queue_time.observe(job.started - job.created)
            self.running = job
            if not self.supervisor.send(Run(job.id, job.requests, job.output_type, job.encoding, job.previews),
                                        self.generation):
                # The group is going down; its GroupDown fails this job.
                pass
            self._gauges()

    def _expire(self, job: Job) -> None:
        if job.future.done():
            return
        error = DeadlineExceeded(f"request {job.id} passed its deadline ({job.deadline - job.created:.1f} s after "
                                 f"admission, {'while queued' if job.state == 'queued' else 'while running'})")
        if job.state == "queued":
            self.queue.remove(job.id)
            self._fail(job, error, "deadline")
            self._gauges()
        else:
            self._stop_running(job, error, "deadline")

    def _stop_running(self, job: Job, error: ServeError, cause: str) -> None:
        """Answer `job` now and have the ranks stop it; restart the group if they do not."""
        if job.state == "running":
            job.state = "stopping"
            self.supervisor.send(Cancel(job.id), job.generation)
            generation = job.generation

            def unresponsive():
                if self.running is job and self.generation == generation:
                    self.supervisor.declare_broken(
                        f"the ranks did not stop request {job.id} within {self.options.stop_grace_s:.0f} s")

            self.loop.call_later(self.options.stop_grace_s, unresponsive)
        self._fail(job, error, cause, keep=True)

    def _fail(self, job: Job, error: ServeError, cause: str | None, *, keep: bool = False) -> None:
        """Answer `job` with `error` (counted by _count under error.outcome); `cause`: also a failure
        (shardiff_failures_total) unless it is a cancel, a shutdown or a user's mistake."""
        if not job.future.done():
            job.future.set_exception(error)
            job.future.exception()  # retrieved: no "never retrieved" warning when nobody waits any more
            if not job.internal and cause is not None and cause not in ("cancelled", "shutdown", "rejected"):
                self.metrics.failures.labels(cause).inc()
        if not keep:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
        self.jobs.pop(job.id, None)

    def _finished(self, msg: Finished) -> None:
        if msg.memory_bytes is not None:
            self.memory[msg.rank] = msg.memory_bytes
            self._update_target()
        job = self.running
        if msg.rank != 0 or job is None or msg.job_id != job.id:
            return
        self.running = None
        self._forget(job)
        if msg.outcome == "done":
            self.queue.record(msg.seconds)
            self.supervisor.request_succeeded()
            if not job.future.done():
                now = time.monotonic()
                job.future.set_result(JobResult(job.id, msg.results, job.started - job.created, msg.seconds,
                                                now - job.created, msg.encode_seconds))
                if not job.internal:
                    self.metrics.latency.observe(now - job.created)
                    self.metrics.generate_time.observe(msg.seconds)
            if job.internal and not any(j.internal for j in self.jobs.values()):
                self._set_ready()
        elif msg.outcome == "stopped":
            self._fail(job, Cancelled(f"request {job.id} was stopped"), "cancelled")
        else:  # "rejected": a mistake the ranks found (the controller's checks should have)
            if job.internal:
                self._give_up(f"warm-up failed: {msg.message}")
                return
            self._fail(job, BadRequest(clean(msg.message)), "rejected")
        self._gauges()
        self._kick()

    # ------------------------------------------------------------------ the group's events

    def _emit(self, event) -> None:
        """Called from the supervisor thread."""
        self.loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event) -> None:
        if isinstance(event, GroupMessage):
            if event.generation == self.generation and isinstance(event.message, Finished):
                self._finished(event.message)
            elif event.generation == self.generation and isinstance(event.message, Partial):
                job = self.running
                if job is not None and job.id == event.message.job_id and job.on_partial is not None \
                        and not job.future.done():
                    job.on_partial(event.message.index, event.message.b64)
        elif isinstance(event, GroupUp):
            self._group_up(event)
        elif isinstance(event, GroupDown):
            self._group_down(event)

    def _group_up(self, event: GroupUp) -> None:
        if self.state in ("stopping", "failed"):
            return
        layouts = {r.layout for r in event.ready}
        if len(layouts) != 1:
            self._give_up(f"the ranks resolved different layouts: {sorted(str(x) for x in layouts)}")
            return
        self.generation, self.pids = event.generation, event.pids
        self.memory = {r.rank: r.memory_bytes for r in event.ready}
        first = event.ready[0]
        self.target = Target(self.info, self.family, self.config, first.layout, explicit_layout=False,
                             tp_note=first.tp_note, memory_bytes=min(self.memory.values()),
                             dtype=getattr(torch, first.dtype))
        self.log(f"model group up: {self.config.model}, layout {first.layout.describe()}, {len(event.ready)} rank(s) "
                 f"on {first.device} ({first.dtype}), pids {' '.join(map(str, event.pids))}"
                 + (f"; {first.tp_note}" if first.tp_note else ""))
        try:
            warmups = self._warmup_jobs()
        except BadRequest as e:
            self._give_up(f"--warmup-sizes: {e}")
            return
        if warmups:
            self.state = "warming"
            for job in reversed(warmups):
                self.jobs[job.id] = job
                self.queue.push(job)
        else:
            self._set_ready()
        self._kick()

    def _warmup_jobs(self) -> list[Job]:
        sizes = self.options.warmup_sizes
        if sizes is None:
            sizes = ((self.info.default_size, self.info.default_size),) if (
                self.config.compile or self.config.cuda_graphs) else ()
        jobs = []
        for width, height in sizes:
            requests = [GenerateRequest(prompt="warm-up", height=height, width=width, steps=WARMUP_STEPS)]
            requests, layout = self._complete(requests)
            jobs.append(Job(f"warmup-{self.generation}-{width}x{height}", requests, layout,
                            self.loop.create_future(), internal=True))
        return jobs

    def _set_ready(self) -> None:
        self.state = "ready"
        self.last_failure = None
        self.ever_ready = True
        self.metrics.ready.set(1)
        self.log("ready")

    def _group_down(self, event: GroupDown) -> None:
        if self.state in ("stopping", "failed"):
            return
        job = self.running
        self.running = None
        kind = event.kind
        self.metrics.failures.labels(kind).inc()
        self.last_failure = event.cause
        if job is not None:
            self._fail(job, WorkerFailure(f"the model group failed during request {job.id}: {clean(event.cause)}",
                                          outcome=kind), None)
        for j in [j for j in self.jobs.values() if j.internal]:
            self.queue.remove(j.id)
            self._forget(j)
        if event.restart_in is None or not self.ever_ready:
            self._give_up(event.cause)
            return
        self.state = "restarting"
        self.metrics.ready.set(0)
        self.metrics.restarts.inc()
        self.log(f"model group failed: {event.cause}; restarting in {event.restart_in:.1f} s "
                 f"({len(self.queue)} queued request(s) kept)")
        self._gauges()

    def _give_up(self, cause: str) -> None:
        """The server cannot serve: answer everything 503, stop the workers, exit non-zero."""
        self.failure = cause
        self.state = "failed"
        self.metrics.ready.set(0)
        self.log(f"error: {cause}")
        for job in [*self.queue.drain(), *([self.running] if self.running else [])]:
            self._fail(job, Unavailable(f"the server stopped: {cause}"), "shutdown")
        self.running = None
        self.stopping.set()  # the runner then closes: workers stopped, exit status 1

    def _update_target(self) -> None:
        if self.target is not None and self.memory:
            self.target = dataclasses.replace(self.target, memory_bytes=min(self.memory.values()))

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(sum(1 for j in self.jobs.values() if j.state == "queued" and not j.internal))
        self.metrics.running.set(int(self.running is not None and not self.running.internal))


def preflight(config, info, fam) -> None:
    """The server's configuration checked before any rank starts (ValueError, one line): what needs
    no rank — the LoRA files against the model, the VAE split's plan."""
    from engine import vae_parallel
    from engine.lora import check_loras

    check_loras(config.loras, config.model, fam, info)
    vae_parallel.preflight(config)


def _log(line: str) -> None:
    print(f"shardiff serve: {line}", file=sys.stderr, flush=True)
