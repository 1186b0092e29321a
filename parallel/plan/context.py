"""What the parts of a plan share: token groups and where a tensor holds them (`SeqDim`, `JointSeqDim`),
the split lengths of each group in the forward call in progress (`SeqContext`), and what installing a
part leaves on the model (`Installed`).

Only what several parts and the attention processors truly share lives here: the mesh and each token
group's per-rank lengths. Whatever else a part needs from call to call (the cfg pair's skip, the
batch's branches, a run's key lengths, a grid's rows, the residuals waiting for their split) is the
part's own state, in its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..mesh import Mesh
from ..sharding import split_sizes


@dataclass(frozen=True)
class SeqDim:
    """A tensor that holds tokens of group `tokens` along dimension `dim`."""

    tokens: str
    dim: int


@dataclass(frozen=True)
class JointSeqDim:
    """A tensor whose dimension `dim` is the concatenation of whole token groups, in this order (a
    rotary table over [text, image] built inside forward). Each group's segment is split by that
    group's split; at most one group may have no split yet in this call: it gets the remaining length."""

    groups: tuple[str, ...]
    dim: int


class SeqContext:
    """Split lengths of each token group in the current forward call, shared by the parts and processors.

    Owned by one parallelized model (not global): processors read it to know every rank's piece
    length, which they need for uneven all-to-alls and ring blocks. Empty outside a sequence split.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.sizes: dict[str, list[int]] = {}
        """Token group → every sp rank's length of it in this call (set by the part that splits it)."""
        self._waiting: list[tuple[str, Callable[[], None]]] = []

    def begin(self) -> None:
        """A new forward call: no group is split yet, and nothing waits for a split of the last one."""
        self.sizes, self._waiting = {}, []

    def set_sizes(self, tokens: str, sizes: list[int]) -> None:
        """Group `tokens` is split so in this call; runs what waited for it (`when_split`)."""
        self.sizes[tokens] = sizes
        ready = [w for w in self._waiting if w[0] == tokens]
        self._waiting = [w for w in self._waiting if w[0] != tokens]
        for _, fn in ready:
            fn()

    def group_sizes(self, tokens: str, n: int, what: str) -> list[int]:
        """Every sp rank's length of token group `tokens` (n tokens in all): set by the first tensor of
        the group split in this call, checked against the others."""
        sizes = self.sizes.get(tokens)
        if sizes is None:
            sizes = split_sizes(n, self.mesh.size("sp"))
            self.set_sizes(tokens, sizes)
        elif sum(sizes) != n:
            raise ValueError(
                f"inputs of token group {tokens!r} disagree in length ({n} tokens {what}, {sum(sizes)} elsewhere)"
            )
        return sizes

    def when_split(self, tokens: str, fn: Callable[[], None]) -> None:
        """Run `fn` once group `tokens` is split in this call (now, if it is already)."""
        if tokens in self.sizes:
            fn()
        else:
            self._waiting.append((tokens, fn))

    def joint_sizes(self, *groups: str) -> list[int] | None:
        """Per-rank lengths of a sequence made by concatenating the local pieces of `groups`."""
        if not self.sizes:
            return None
        return [sum(parts) for parts in zip(*(self.sizes[g] for g in groups))]


class Installed:
    """What one part of a plan put on a model; `remove` takes it off again.

    A part with work around each forward call of the whole model (a split of its inputs, a gather of
    its output) sets `calls`: the plan runs every such part's `before` in its step order and their
    `after` in the reverse order, from one pre-hook and one hook on the model. Module hooks of the
    part go into `handles` (removed by the default `remove`).
    """

    calls: bool = False

    def __init__(self):
        self.handles: list = []

    def before(self, arguments: dict) -> bool:
        """Change the bound forward arguments of this call in place. True: this rank leaves the call
        to another rank (a cfg pair's other call): no later part's `before` or `after` runs."""
        return False

    def after(self, output):
        """The call's output, as this part leaves it."""
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
