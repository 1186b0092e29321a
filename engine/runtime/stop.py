"""Stopping a running generation at the same denoising step on every rank.

A stop request (a cancel, a deadline) reaches the ranks at different moments; a rank that left the
denoising loop alone would leave the others waiting in their next collective. So the ranks agree:
after every step each rank calls `AgreedStop.__call__`, which reads the answer of the small
all-reduce (MAX of every rank's local flag) started one step earlier and starts the next one. Every
rank of an image reads the answer of the same collective at the same step, so all of them raise
`Stopped` together, between two steps (never inside a denoiser call, where a plan's hooks hold
state). Reading the previous step's answer keeps the wait off the critical path: by the end of a
step its all-reduce (one integer, over a dedicated gloo group) has long finished.

The ranks that take part are those drawing one image: with data parallelism, each dp slice agrees
on its own, and engine/data_parallel.generate_batch then agrees over the slices before gathering.

`step_callback_kwargs` hands the callback to a diffusers pipeline through its own per-step hook
(`callback_on_step_end`, or the older `callback` of PixArt-Σ), called after the scheduler step.
"""

from __future__ import annotations

import inspect
import threading
from datetime import timedelta

import torch
import torch.distributed as dist


class Stopped(Exception):
    """The generation was stopped at an agreed step (every rank of the image raises it at once)."""


def step_callback_kwargs(pipe, on_step) -> dict:
    """Pipeline keyword arguments that call `on_step(step)` after every denoising step ({} for None);
    `on_step(step, pipe, latents)` when it has a true `takes_latents` attribute (previews)."""
    if on_step is None:
        return {}
    latents_too = getattr(on_step, "takes_latents", False)
    params = inspect.signature(type(pipe).__call__).parameters
    if "callback_on_step_end" in params:
        def on_step_end(pipeline, step, timestep, callback_kwargs):
            if latents_too:
                on_step(step, pipeline, callback_kwargs.get("latents"))
            else:
                on_step(step)
            return callback_kwargs

        return {"callback_on_step_end": on_step_end}
    if "callback" in params:
        if latents_too:
            return {"callback": lambda step, timestep, latents: on_step(step, pipe, latents), "callback_steps": 1}
        return {"callback": lambda step, timestep, latents: on_step(step), "callback_steps": 1}
    raise ValueError(f"{type(pipe).__name__} has no per-step callback: its generations cannot be stopped")


class AgreedStop:
    """A stop flag that every rank drawing one image reads at the same step.

    `request()` may be called from any thread (the server's channel reader); the per-step check runs
    on the generating thread. `settle()` after each generation (finished or stopped) waits for the
    last all-reduce so that the group is idle between requests. `reset()` before the next one.
    """

    def __init__(self, engine, timeout: timedelta = timedelta(minutes=5)):
        """Collective (new_group) when the job has several ranks: every rank constructs it, at once."""
        self.engine = engine
        self._flag = threading.Event()
        self._pending: tuple | None = None
        self._groups: dict[int, object] = {}
        """dp degree → the gloo group of this rank's dp slice (consecutive ranks: dp is the outer axis)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Every dp degree a layout may take, made now: new_group needs every rank of the job, and
            # with more dp slices than images some slices never reach a step.
            world, rank = dist.get_world_size(), dist.get_rank()
            for dp in (d for d in range(1, world + 1) if world % d == 0):
                size = world // dp
                for d in range(dp):
                    g = dist.new_group(list(range(d * size, (d + 1) * size)), backend="gloo", timeout=timeout)
                    if d == rank // size:
                        self._groups[dp] = g

    def request(self) -> None:
        self._flag.set()

    def reset(self) -> None:
        assert self._pending is None, "settle() the previous generation first"
        self._flag.clear()

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def __call__(self, step: int) -> None:
        if not self._groups:
            if self._flag.is_set():
                raise Stopped(f"stopped after step {step}")
            return
        if self._collect():
            # Every rank of the image read this same answer: all of them stop here, none starts another.
            raise Stopped(f"stopped after step {step}")
        flag = torch.tensor([int(self._flag.is_set())], dtype=torch.int32)
        group = self._groups[self.engine.parallel.dp]
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True), flag)

    def settle(self) -> None:
        """Wait for the all-reduce still in flight after a generation (every rank calls it)."""
        self._collect()

    def _collect(self) -> bool:
        """The answer of the all-reduce started one step earlier (False when there is none)."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())
