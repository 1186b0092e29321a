"""A request the pipeline refuses is a request error, not a broken group: the ranks agree on it first.

A request can pass every check of engine/validation.py and still be refused by the pipeline itself —
its own `check_inputs`, the tokenizer, an input the VAE cannot take — while it prepares the call,
before its first collective. Every rank raises alike and the group is intact; but unhandled, each rank
leaves the call on its own and the server must treat that as a failure of the group (a restart). The
gate makes the ranks agree instead:

- the modules whose calls may run a collective (the denoiser, the ControlNets, a row-split VAE,
  sharded text encoders) get a forward pre-hook, first in line, that joins the gate at the first such
  call of a pipeline call;
- a rank whose pipeline call raises before that point joins the same gate from its exception handler.

So every rank of the image (its dp slice) meets the others in the gate exactly once per pipeline call,
whatever it did: one all-reduce of a small status on a dedicated gloo group — cheap when all is well,
and it cannot hang on a rank that raised. If every rank raised an ordinary exception, each raises
`RequestRefused` (a UserError, with the pipeline's message: the request's fault, the group serves the
next one). If a rank ran out of memory or raised something fatal, or some ranks raised while others
were ready, the group is broken: those that raised re-raise their own error, the others `PeerFailed`.

What the gate does not cover: a rank that dies or hangs (the server's supervisor notices); an error
inside or after a collective (a broken group); under `--text-encoders first`, the text encoding's own
broadcast comes before the gate (an error on the encoding rank is shared by that broadcast, and raised
on every rank, so it is still agreed here).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .distributed import UserError

PREPARED, RAISED, FATAL = 0, 1, 2


class RequestRefused(UserError):
    """Every rank's pipeline refused the request while preparing it; the group is intact."""


class PeerFailed(RuntimeError):
    """Another rank failed fatally (or alone) while preparing the request: the group cannot go on."""


def slice_groups(timeout: timedelta) -> dict:
    """dp degree → the gloo group of this rank's dp slice (consecutive ranks: dp is the outer axis), for
    every dp degree a layout may take; {} with one rank. Collective: every rank calls it at once."""
    groups = {}
    if dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        for dp in (d for d in range(1, world + 1) if world % d == 0):
            size = world // dp
            for d in range(dp):
                g = dist.new_group(list(range(d * size, (d + 1) * size)), backend="gloo", timeout=timeout)
                if d == rank // size:
                    groups[dp] = g
    return groups


def collective_modules(engine) -> list:
    """(module, when) pairs: the modules whose calls may run a collective, and a predicate saying whether
    they do under the engine's current set-up (a VAE runs whole unless its row split is installed)."""
    always = lambda: True  # noqa: E731
    out = [(engine.denoiser, always)]
    if engine.controlnet is not None:
        out.append((engine.controlnet, always))
    vae = getattr(engine.pipe, "vae", None)
    if vae is not None:
        split = lambda: engine.vae_split is not None  # noqa: E731
        out += [(part, split) for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None))
                if isinstance(part, torch.nn.Module)]
    plan = engine.text_encoders.plan
    if plan.placement == "sharded":
        out += [(getattr(engine.pipe, name), always) for name, degree in plan.degrees.items()
                if degree > 1 and isinstance(getattr(engine.pipe, name, None), torch.nn.Module)]
    return out


class PreparationGate:
    """Install on an Engine (`engine.gate = PreparationGate(engine)`, on every rank at once: it makes
    its process groups); `Engine.generate` runs each pipeline call inside `pipeline_call()`."""

    def __init__(self, engine, timeout: timedelta = timedelta(minutes=5)):
        self.engine = engine
        self._groups = slice_groups(timeout)
        self._armed = False
        self._passed = False
        self._handles = [module.register_forward_pre_hook(self._hook(when), prepend=True)
                         for module, when in collective_modules(engine)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def pipeline_call(self):
        self._armed, self._passed = True, False
        try:
            yield
        except BaseException as e:
            if self._armed and not self._passed:
                self._passed = True
                self._agree(FATAL if _fatal(e) else RAISED, e)
            raise
        finally:
            self._armed = False

    def _hook(self, when):
        def pre_hook(module, args):
            if self._armed and not self._passed and when():
                self._passed = True
                self._agree(PREPARED, None)
        return pre_hook

    def _agree(self, status: int, error: BaseException | None) -> None:
        """Meet the other ranks of this image; return to go on (or to re-raise this rank's own error)."""
        group = self._groups.get(self.engine.parallel.dp)
        if group is None:  # one rank: nobody to wait for
            worst = best = status
        else:
            both = torch.tensor([status, -status], dtype=torch.int32)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
            worst, best = int(both[0]), -int(both[1])
        if worst == PREPARED:
            return
        if worst == RAISED and best == RAISED:  # every rank raised an ordinary exception: the request's fault
            mine = describe(error)
            if group is None:
                messages = [mine]
            else:
                messages = [None] * dist.get_world_size(group)
                dist.all_gather_object(messages, mine, group=group)
            raise RequestRefused("the pipeline refused the request: " + "; ".join(dict.fromkeys(messages))) from error
        if status == PREPARED:
            raise PeerFailed("another rank failed while preparing the request")
        # This rank raised: its own error is the cause (the caller re-raises it).


def _fatal(e: BaseException) -> bool:
    return (not isinstance(e, Exception) or isinstance(e, (torch.OutOfMemoryError, MemoryError, dist.DistError))
            or isinstance(e, PeerFailed))


def describe(e: BaseException | None) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip() if e is not None else ""
    return text.splitlines()[0] if text else type(e).__name__
