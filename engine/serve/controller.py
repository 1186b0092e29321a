"""The controller: completes and checks each request, queues it, runs it on the worker group, answers.

Runs on one asyncio event loop (uvicorn's, or a background thread's for `serve.start`) and does no
GPU work. For every request it decides everything before any rank sees it — the request id, the
image size (the model's default when none is given), the layout (engine/request_check.check_requests,
the engine's own rule) — so that every rank runs the identical request and a user mistake is a 400
that costs no rank anything. One request runs at a time on a group; the rest wait in one bounded FIFO
for every group (--replicas: several groups, engine/serve/group.py), and a free group takes the next
(engine/serve/dispatch.py: arrival order, bent within a bound to spare LoRA switches).

Deadlines: a request past its deadline is answered 504 at once; if it was running, the ranks are told
to stop (they stop together at the next step, engine/runtime/stop.py) and the group takes the next
request as soon as they have. Cancels work the same way. A group that does not stop within
`stop_grace_s` of being told is declared broken and restarted.

Failures: a group's supervisor reports that it lost a rank (death, out of memory, exception, a rank
that stopped answering); its running request gets a 500 naming the cause, queued requests stay queued
and run on the other groups, or after the restart. A group past its restarts is given up; the server
gives up when every group is. A request that the ranks refuse while preparing it (the pipeline's own
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

from engine.limits import check_limits, model_limits
from engine.config import GenerateRequest
from engine.loading import resolve_model
from engine.loading.pipeline import stand_in_processors
from engine.loading.processors import note as processor_note
from engine.pipelines import max_input_images
from engine.request_check import check_requests
from engine.validation import resolve_size

from .admission import AdmissionQueue, Job, JobResult, QueueFull  # noqa: F401 — JobResult: the API too
from .errors import (  # noqa: F401 — the error classes are the controller's API too
    BadRequest, Cancelled, Conflict, DeadlineExceeded, Forbidden, NotFound, PayloadTooLarge, ServeError,
    TooManyRequests, Unauthorized, Unavailable, UnsupportedMediaType, WorkerFailure, check_request_id, clean,
)
from .api import check_lora
from .dispatch import pick
from .events import GroupEvents
from .group import Group, group_devices
from .metrics import Metrics
from .options import ServeOptions
from .protocol import Cancel, Run


class Controller(GroupEvents):
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
        preflight(config, self.info, self.family, options.adapters)
        self.adapters = {a.name: a for a in options.adapters}
        """Named LoRA adapters a request may choose, by name."""
        for width, height in options.warmup_sizes or ():
            try:  # what can be checked before any rank exists; the rest when the group is up
                resolve_size(GenerateRequest(prompt="warm-up", height=height, width=width), self.info)
            except ValueError as e:
                raise ValueError(f"--warmup-sizes {width}x{height}: {e}") from None
        self.metrics = Metrics()
        self.started = time.time()
        self.queue: AdmissionQueue | None = None
        self.state = "serving"
        """serving (its groups say how), stopping, failed."""
        self.failure: str | None = None
        """Why the server gave up (it then exits non-zero)."""
        self.jobs: dict[str, Job] = {}
        """Every job queued or running, by id."""
        self.stopping: asyncio.Event | None = None
        """Set when the server should stop (a shutdown was asked for, or it gave up)."""
        self.done: asyncio.Event | None = None
        """Set when it has stopped: workers gone."""
        devices = group_devices(options.replicas, options.world_size, config)
        self.groups = [Group(i, config, options, self._emit, devices[i]) for i in range(options.replicas)]
        for group in self.groups:
            self.metrics.ready.labels(group.label).set(0)
            self.metrics.running.labels(group.label).set(0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue = AdmissionQueue(self.options.max_queue)
        self.stopping = asyncio.Event()
        self.done = asyncio.Event()
        for group in self.groups:
            group.supervisor.start()

    @property
    def ready(self) -> bool:
        """At least one group takes requests."""
        return self.state == "serving" and any(g.state == "ready" for g in self.groups)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until every group is warm, or given up while another is (or the server failed: ServeError)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not (self.ready and all(g.state in ("ready", "failed") for g in self.groups)):
            if self.state in ("failed", "stopping"):
                raise Unavailable(self.failure or "the server is stopping")
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"the server did not become ready in {timeout:.0f} s (state: {self.status()})")
            await asyncio.sleep(0.05)

    def begin_shutdown(self) -> None:
        """Stop admitting; answer the queued requests 503; let the running ones finish (see close)."""
        if self.state in ("stopping", "failed"):
            return
        self.state = "stopping"
        self.stopping.set()
        for group in self.groups:
            self.metrics.ready.labels(group.label).set(0)
        for job in self.queue.drain():
            self._fail(job, Unavailable("the server is shutting down"), "shutdown")
        self._gauges()

    async def close(self) -> None:
        """Shut down: drain (below), then the workers are told to exit and killed if they do not. Idempotent."""
        if self.done.is_set():
            return
        await self.drain()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, g.supervisor.stop) for g in self.groups))
        for group in self.groups:
            if group.running is not None:
                self._fail(group.running, Unavailable("the server is shutting down"), "shutdown")
                group.running = None
        self.done.set()

    def running_jobs(self) -> list[Job]:
        """The users' jobs running now, one per busy group."""
        return [g.running for g in self.groups if g.running is not None and not g.running.internal]

    async def drain(self) -> None:
        """Stop admitting, answer the queued requests 503; the running requests have drain_timeout_s to
        finish, then they are stopped and answered 503 (their ranks get up to 10 s more to stop)."""
        self.begin_shutdown()
        jobs = self.running_jobs()
        end = time.monotonic() + self.options.drain_timeout_s
        while any(j.group.running is j for j in jobs) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        left = [j for j in jobs if j.group.running is j]
        for job in left:
            self.cancel(job.id, Unavailable("the server is shutting down"))
        end = time.monotonic() + min(self.options.stop_grace_s, 10.0)
        while any(j.group.running is j for j in left) and time.monotonic() < end:
            await asyncio.sleep(0.05)

    def status(self) -> str:
        """The server's state as /health says it: ready while any group is."""
        if self.state != "serving":
            return self.state
        states = {g.state for g in self.groups}
        return next(s for s in ("ready", "warming", "restarting", "starting", "failed") if s in states)

    def health(self) -> dict:
        groups = [g.health() for g in self.groups]
        status = self.status()
        failures = [g.last_failure for g in self.groups if g.last_failure and g.state != "ready"]
        return {
            "status": status,
            "model": self.config.model,
            "layout": next((g["layout"] for g in groups if g["layout"]), None),
            "world_size": self.options.world_size,
            "replicas": len(groups),
            "generation": sum(max(g.generation, 0) for g in self.groups),
            "workers": [pid for g in groups for pid in g["workers"]],
            "queue": len(self.queue) if self.queue is not None else 0,
            "running": len(self.running_jobs()),
            "groups": groups,
            **({"error": clean(self.failure)} if self.failure else {}),
            **({"last_failure": clean(failures[0])} if failures and status != "ready" else {}),
        }

    # ------------------------------------------------------------------ requests

    @staticmethod
    def new_id() -> str:
        return f"img-{uuid.uuid4().hex}"

    def admit(self, requests: list, *, request_id: str | None = None, timeout: float | None = None,
              output_type: str = "pil", encoding=None, previews=None, on_partial=None, lora=None) -> Job:
        """Check, complete and queue `requests` (one job); ServeError when refused (counted once under
        its outcome). `encoding`: the first rank sends encoded image files (engine/serve/encode.py);
        `previews` + `on_partial(index, b64)`: partial images (engine/serve/preview.py); `lora`: the named
        adapters to run with, {name: scale} (a scale None: the adapter's own). Loop thread only."""
        try:
            return self._admit(requests, request_id, timeout, output_type, encoding, previews, on_partial, lora)
        except ServeError as e:
            self.metrics.requests.labels(e.outcome).inc()
            raise

    def _admit(self, requests, request_id, timeout, output_type, encoding, previews, on_partial, lora) -> Job:
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
        try:
            lora = check_lora(lora, self.adapters)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        limit = self.options.request_timeout_s
        if timeout is not None:
            if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
                raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
            limit = min(limit, float(timeout))
        layout = None
        target = self._target()
        if target is not None:
            requests, layout = self._complete(requests, target)
        job = Job(job_id, requests, layout, self.loop.create_future(), output_type=output_type,
                  deadline=time.monotonic() + limit, encoding=encoding, previews=previews, on_partial=on_partial,
                  lora=lora)
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
        at the next step on every rank of its group), None (no such job)."""
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

    def _target(self):
        """What a request is checked against: the group that is up with the least memory left, or None."""
        targets = [g.target for g in self.groups if g.target is not None and g.state != "failed"]
        return min(targets, key=lambda t: t.memory_bytes) if targets else None

    def _complete(self, requests: list, target):
        """(requests with their size filled in, layout); BadRequest with the CLI's message. The request's one
        check in this process (each rank checks it once more, against what it holds)."""
        try:
            batch = check_requests(requests, target)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        done = [dataclasses.replace(r, height=c.height, width=c.width) for r, c in zip(requests, batch.requests)]
        return done, batch.layout

    # ------------------------------------------------------------------ running

    def _kick(self) -> None:
        """Start warm-ups on the groups warming, then queued jobs on the free groups (engine/serve/dispatch.py)."""
        if self.state != "serving":
            return
        for group in self.groups:
            if group.state == "warming" and group.running is None and group.warmups:
                self._run(group, group.warmups.pop(0))
        while True:
            choice = pick(self.queue.jobs(), [g for g in self.groups if g.free], self.options.max_passes)
            if choice is None:
                return
            job, group = choice
            self.queue.remove(job.id)
            if job.layout is None:  # admitted before any group first came up: checked now
                try:
                    job.requests, job.layout = self._complete(job.requests, group.target)
                except BadRequest as e:
                    self._fail(job, e, None)
                    continue
            self._run(group, job)

    def _run(self, group: Group, job: Job) -> None:
        job.state, job.started, job.group, job.generation = "running", time.monotonic(), group, group.generation
        loras = None
        if not job.internal:
            self.metrics.queue_time.observe(job.started - job.created)
            loras = (*self.config.loras, *(dataclasses.replace(self.adapters[name], scale=scale)
                                           for name, scale in job.lora_key))
            if group.fused != job.lora_key:
                self.metrics.lora_switches.labels(group.label).inc()
            group.fused = job.lora_key
        group.running = job
        # False when the group is going down: its GroupDown fails this job.
        group.supervisor.send(Run(job.id, job.requests, job.output_type, job.encoding, job.previews, loras),
                              group.generation)
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
        """Answer `job` now and have its ranks stop it; restart its group if they do not."""
        if job.state == "running":
            job.state = "stopping"
            group, generation = job.group, job.generation
            group.supervisor.send(Cancel(job.id), generation)

            def unresponsive():
                if group.running is job and group.generation == generation:
                    group.supervisor.declare_broken(
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

    def _give_up(self, cause: str) -> None:
        """The server cannot serve: answer everything 503, stop the workers, exit non-zero."""
        self.failure = cause
        self.state = "failed"
        self.log(f"error: {cause}")
        running = [g.running for g in self.groups if g.running is not None]
        for job in [*self.queue.drain(), *running]:
            self._fail(job, Unavailable(f"the server stopped: {cause}"), "shutdown")
        for group in self.groups:
            group.running = None
            self.metrics.ready.labels(group.label).set(0)
        self.stopping.set()  # the runner then closes: workers stopped, exit status 1

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(sum(1 for j in self.jobs.values() if j.state == "queued" and not j.internal))
        for group in self.groups:
            self.metrics.running.labels(group.label).set(
                int(group.running is not None and not group.running.internal))


def preflight(config, info, fam, adapters=()) -> None:
    """The server's configuration checked before any rank starts (ValueError, one line): what needs
    no rank — the LoRA files (plain and named) against the model, the VAE split's plan."""
    from engine import vae_parallel
    from engine.lora import check_loras

    check_loras((*config.loras, *adapters), config.model, fam, info)
    vae_parallel.preflight(config)


def _log(line: str) -> None:
    print(f"shardiff serve: {line}", file=sys.stderr, flush=True)
