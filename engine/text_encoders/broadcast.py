"""`--text-encoders first`: one rank encodes, the others receive its embeddings.

Every pipeline encodes through methods of its own (`encode_prompt` in every family; a family that
encodes otherwise names its methods in `Family.encode_methods`), so one instance-level wrapper of
those methods serves all of them. On the encoding rank the wrapper runs the method and broadcasts
what it returned over the ranks of the image: first the structure (tuples / lists / dicts of tensors,
None, numbers) with each tensor's shape, dtype and device kind, then each tensor. The other ranks,
which hold no text encoder, skip the method and return the received structure. Every rank of the
image runs the same request (SPMD), so each call on one rank meets the same call on the others.

An exception on the encoding rank is broadcast in place of the structure and raised on every rank
(a ValueError stays a ValueError): nobody waits for tensors that never come. A wrapped method that
the encoding rank calls from inside another (an inner helper) runs plainly there: the others never
enter the outer one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _pack(obj, tensors: list):
    """A picklable skeleton of `obj`, its tensors appended to `tensors` in order."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device.type)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, [_pack(o, tensors) for o in obj])
    if isinstance(obj, dict):
        return ("dict", {k: _pack(v, tensors) for k, v in obj.items()})
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("value", obj)
    raise TypeError(f"cannot broadcast a text encoding's {type(obj).__name__}")


def _unpack(skeleton, tensors):
    kind, body = skeleton[0], skeleton[1]
    if kind == "tensor":
        return next(tensors)
    if kind in ("tuple", "list"):
        items = [_unpack(s, tensors) for s in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in body.items()}
    return body


def _empty_like(skeleton, device: torch.device, out: list) -> None:
    kind, body = skeleton[0], skeleton[1]
    if kind == "tensor":
        _, shape, dtype, device_type = skeleton
        out.append(torch.empty(shape, dtype=dtype, device="cpu" if device_type == "cpu" else device))
    elif kind in ("tuple", "list"):
        for s in body:
            _empty_like(s, device, out)
    elif kind == "dict":
        for s in body.values():
            _empty_like(s, device, out)


class BroadcastEncoding:
    """Wraps `methods` of `pipe` on this instance; `remove()` restores them."""

    def __init__(self, pipe, methods: tuple[str, ...], *, src: int, group, device: torch.device):
        self.pipe, self.src, self.group, self.device = pipe, src, group, device
        self.encodes = dist.get_rank() == src
        self._depth = 0
        self._restore = []
        for name in methods:
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        pipe = self.pipe
        original = getattr(pipe, name)
        had_own = name in vars(pipe)

        def encode(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            return self._send(original, args, kwargs) if self.encodes else self._receive()

        setattr(pipe, name, encode)
        self._restore.append(lambda: setattr(pipe, name, original) if had_own else delattr(pipe, name))

    def _send(self, original, args, kwargs):
        self._depth += 1
        try:
            out = original(*args, **kwargs)
            tensors: list = []
            header = ("ok", _pack(out, tensors))
        except Exception as e:  # shared with the other ranks, then raised here too
            header, error = ("error", type(e).__name__, str(e)), e
        finally:
            self._depth -= 1
        dist.broadcast_object_list([header], src=self.src, group=self.group)
        if header[0] == "error":
            raise error
        for t in tensors:
            dist.broadcast(t.contiguous(), src=self.src, group=self.group)
        return out

    def _receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        header = box[0]
        if header[0] == "error":
            kind = ValueError if header[1] == "ValueError" else RuntimeError
            raise kind(f"text encoding failed on rank {self.src}: {header[2]}")
        tensors: list = []
        _empty_like(header[1], self.device, tensors)
        for t in tensors:
            dist.broadcast(t, src=self.src, group=self.group)
        return _unpack(header[1], iter(tensors))

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
