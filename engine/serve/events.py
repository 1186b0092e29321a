"""The controller's half that hears its model groups (engine/serve/group.py): a group up (warm-ups,
then ready), a message of its ranks (a job finished, a partial image), a group down (its running job
answered 500, restarted or given up). A mixin of Controller (engine/serve/controller.py), on its event
loop; the supervisors' threads only hand events over (`_emit`).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from engine.config import GenerateRequest
from engine.request_check import Target

from .admission import Job, JobResult
from .errors import BadRequest, Cancelled, WorkerFailure, clean
from .group import Group
from .protocol import Finished, Partial
from .supervisor import GroupDown, GroupMessage, GroupUp

WARMUP_STEPS = 3
"""Denoising steps of a warm-up request: the compile happens on the first call; CUDA graphs capture
on the third call of a shape (after two eager warm-up calls)."""


class GroupEvents:
    def _finished(self, group: Group, msg: Finished) -> None:
        if msg.memory_bytes is not None:
            group.memory[msg.rank] = msg.memory_bytes
            if group.target is not None:
                group.target = dataclasses.replace(group.target, memory_bytes=min(group.memory.values()))
        job = group.running
        if msg.rank != 0 or job is None or msg.job_id != job.id:
            return
        group.running = None
        self._forget(job)
        if msg.outcome == "done":
            self.queue.record(msg.seconds)
            group.supervisor.request_succeeded()
            if not job.future.done():
                now = time.monotonic()
                job.future.set_result(JobResult(job.id, msg.results, job.started - job.created, msg.seconds,
                                                now - job.created, msg.encode_seconds, dict(job.lora_key),
                                                msg.lora_seconds, group.index))
                if not job.internal:
                    self.metrics.latency.observe(now - job.created)
                    self.metrics.generate_time.labels(group.label).observe(msg.seconds)
            if job.internal and not group.warmups:
                self._set_ready(group)
        elif msg.outcome == "stopped":
            self._fail(job, Cancelled(f"request {job.id} was stopped"), "cancelled")
        else:  # "rejected": a mistake the ranks found (the controller's checks should have)
            if job.internal:
                self._group_failed(group, f"warm-up failed: {msg.message}", user_error=True)
                return
            self._fail(job, BadRequest(clean(msg.message)), "rejected")
        self._gauges()
        self._kick()

    def _emit(self, group: Group, event) -> None:
        """Called from a supervisor's thread."""
        self.loop.call_soon_threadsafe(self._on_event, group, event)

    def _on_event(self, group: Group, event) -> None:
        if isinstance(event, GroupMessage):
            if event.generation == group.generation and isinstance(event.message, Finished):
                self._finished(group, event.message)
            elif event.generation == group.generation and isinstance(event.message, Partial):
                job = group.running
                if job is not None and job.id == event.message.job_id and job.on_partial is not None \
                        and not job.future.done():
                    job.on_partial(event.message.index, event.message.b64)
        elif isinstance(event, GroupUp):
            self._group_up(group, event)
        elif isinstance(event, GroupDown):
            self._group_down(group, event)

    def _group_up(self, group: Group, event: GroupUp) -> None:
        if self.state != "serving" or group.state == "failed":
            return
        layouts = {r.layout for r in event.ready}
        if len(layouts) != 1:
            self._give_up(f"the ranks resolved different layouts: {sorted(str(x) for x in layouts)}")
            return
        first = event.ready[0]
        group.up(event, Target(self.info, self.family, self.config, first.layout, explicit_layout=False,
                               tp_note=first.tp_note, memory_bytes=min(r.memory_bytes for r in event.ready),
                               dtype=getattr(torch, first.dtype)))
        name = f"model group {group.index}" if len(self.groups) > 1 else "model group"
        self.log(f"{name} up: {self.config.model}, layout {first.layout.describe()}, {len(event.ready)} rank(s) "
                 f"on {first.device} ({first.dtype}), pids {' '.join(map(str, event.pids))}"
                 + (f", GPUs {','.join(group.devices)}" if group.devices else "")
                 + (f"; {first.tp_note}" if first.tp_note else ""))
        try:
            group.warmups = self._warmup_jobs(group)
        except BadRequest as e:
            self._give_up(f"--warmup-sizes: {e}")
            return
        if group.warmups:
            group.state = "warming"
        else:
            self._set_ready(group)
        self._kick()

    def _warmup_jobs(self, group: Group) -> list[Job]:
        sizes = self.options.warmup_sizes
        if sizes is None:
            sizes = ((self.info.default_size, self.info.default_size),) if (
                self.config.compile or self.config.cuda_graphs) else ()
        jobs = []
        for width, height in sizes:
            requests = [GenerateRequest(prompt="warm-up", height=height, width=width, steps=WARMUP_STEPS)]
            requests, layout = self._complete(requests, group.target)
            jobs.append(Job(f"warmup-{group.index}-{group.generation}-{width}x{height}", requests, layout,
                            self.loop.create_future(), internal=True))
        return jobs

    def _set_ready(self, group: Group) -> None:
        group.state = "ready"
        group.last_failure = None
        group.ever_ready = True
        self.metrics.ready.labels(group.label).set(1)
        self.log("ready" if len(self.groups) == 1 else f"model group {group.index} ready")

    def _group_down(self, group: Group, event: GroupDown) -> None:
        if self.state != "serving" or group.state == "failed":
            return
        job = group.running
        group.running, group.warmups = None, []
        kind = event.kind
        self.metrics.failures.labels(kind).inc()
        group.last_failure = event.cause
        self.metrics.ready.labels(group.label).set(0)
        if job is not None:
            self._fail(job, WorkerFailure(f"the model group failed during request {job.id}: {clean(event.cause)}",
                                          outcome=kind), None)
        if event.restart_in is None or not group.ever_ready:
            self._group_failed(group, event.cause, user_error=event.user_error)
            return
        group.state = "restarting"
        self.metrics.restarts.labels(group.label).inc()
        name = f"model group {group.index}" if len(self.groups) > 1 else "model group"
        self.log(f"{name} failed: {event.cause}; restarting in {event.restart_in:.1f} s "
                 f"({len(self.queue)} queued request(s) kept)")
        self._gauges()
        self._kick()  # the other groups take what it would have

    def _group_failed(self, group: Group, cause: str, *, user_error: bool = False) -> None:
        """`group` is given up (past its restarts, or it never came up); the server too when it was the
        last, or when the cause is the configuration's (every group would meet it)."""
        group.state, group.last_failure, group.running, group.warmups = "failed", cause, None, []
        self.metrics.ready.labels(group.label).set(0)
        if user_error or all(g.state == "failed" for g in self.groups):
            self._give_up(cause)
            return
        self.log(f"model group {group.index} given up: {cause}; {sum(g.state != 'failed' for g in self.groups)} "
                 "group(s) serve on")
        self.loop.run_in_executor(None, group.supervisor.stop)
        self._gauges()
