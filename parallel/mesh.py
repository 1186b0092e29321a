"""One named mesh of process groups, built once and passed around explicitly.

`Mesh` owns one process group per axis, and two flattened ones: the sequence-parallel axis "sp" =
ring × ulysses, and "image" = every axis but dp (cfg × ring × ulysses × tp): the ranks that hold the
same image, which share its VAE decode. "image" reuses the group of an axis with exactly its ranks
(image = ulysses when only Ulysses is > 1) rather than opening another communicator: the decode
runs after the denoiser, never beside it. Groups are created here with an explicit timeout:
`DeviceMesh` and `new_group` otherwise fall back to the backend's default (up to 30 min for a stuck
NCCL collective), which is exactly the hang users complain about. A `DeviceMesh` view for
`parallelize_module` is built on demand from the same groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import AXES, ParallelConfig

# The flattened sequence axis: piece index of a rank = ring_coord * ulysses + ulysses_coord, so the
# ranks of one Ulysses group hold consecutive pieces and a ring member's block is contiguous.
SP_AXES = ("ring", "ulysses")
# The ranks of one image: all but dp, in mesh order (piece index = row-major coordinate over these).
IMAGE_AXES = ("cfg", "ring", "ulysses", "tp")
FLAT_AXES = {"sp": SP_AXES, "image": IMAGE_AXES}


@dataclass(eq=False)
class Mesh:
    config: ParallelConfig
    ranks: tuple[int, ...]
    """Global ranks in this mesh, in mesh order (row-major over AXES)."""
    rank: int
    """This process's global rank."""
    device: torch.device
    coords: dict[str, int]
    groups: dict[str, dist.ProcessGroup | None] = field(repr=False)
    """Axis name → group holding this rank (None where the axis has size 1: no communication)."""

    def size(self, axis: str) -> int:
        if axis in FLAT_AXES:
            return math.prod(getattr(self.config, a) for a in FLAT_AXES[axis])
        return getattr(self.config, axis)

    def coord(self, axis: str) -> int:
        if axis in FLAT_AXES:
            index = 0
            for a in FLAT_AXES[axis]:
                index = index * getattr(self.config, a) + self.coords[a]
            return index
        return self.coords[axis]

    def group(self, axis: str) -> dist.ProcessGroup | None:
        return self.groups[axis]

    @property
    def is_first(self) -> bool:
        """The rank that talks to the user (prints, saves)."""
        return self.rank == self.ranks[0]

    @classmethod
    def single(cls, device: torch.device) -> "Mesh":
        cfg = ParallelConfig()
        return cls(cfg, (0,), 0, device, {a: 0 for a in AXES}, {a: None for a in (*AXES, *FLAT_AXES)})

    @classmethod
    def build(
        cls,
        config: ParallelConfig,
        device: torch.device,
        *,
        ranks: list[int] | None = None,
        timeout: timedelta = timedelta(minutes=5),
    ) -> "Mesh | None":
        """Create the groups of `config` over `ranks` (default: the whole world).

        Every process of the default group must call this with the same arguments (new_group is
        collective over the world), also those outside `ranks`: they get None.
        """
        if not dist.is_initialized():
            assert config.world_size == 1, "a parallel layout needs torch.distributed initialised"
            return cls.single(device)
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        config.check_world_size(len(ranks))
        shape = [getattr(config, a) for a in AXES]
        grid = torch.tensor(ranks).reshape(shape)
        me = dist.get_rank()
        groups: dict[str, dist.ProcessGroup | None] = {}
        made: dict[tuple[int, ...], str] = {}
        """Dims of size > 1 → the axis whose group spans exactly them."""
        for name, axes in [(a, (a,)) for a in AXES] + list(FLAT_AXES.items()):
            dims = [AXES.index(a) for a in axes]
            if all(shape[d] == 1 for d in dims):
                groups[name] = None
                continue
            key = tuple(d for d in dims if shape[d] > 1)
            if name == "image" and key in made:  # the same ranks as an axis made above: same slices, same order
                groups[name] = groups[made[key]]
                continue
            made.setdefault(key, name)
            groups[name] = None
            other = [d for d in range(len(AXES)) if d not in dims]
            # Move the axis dims last and enumerate every slice: all processes create every group in the
            # same order, as new_group requires.
            slices = grid.permute(*other, *dims).reshape(-1, math.prod(shape[d] for d in dims))
            for members in slices.tolist():
                g = dist.new_group(members, timeout=timeout)
                if me in members:
                    groups[name] = g
        if me not in ranks:
            return None
        coords_t = (grid == me).nonzero()[0].tolist()
        return cls(config, tuple(ranks), me, device, dict(zip(AXES, coords_t)), groups)

    def device_mesh(self, axes: tuple[str, ...]):
        """A torch DeviceMesh over `axes` of this mesh (for DTensor / parallelize_module)."""
        from torch.distributed.device_mesh import DeviceMesh

        shape = [getattr(self.config, a) for a in AXES]
        grid = torch.tensor(self.ranks).reshape(shape)
        index = tuple(slice(None) if a in axes else self.coords[a] for a in AXES)
        sub = grid[index]
        groups = [self.groups[a] for a in axes]
        assert all(g is not None for g in groups), "device_mesh over an axis of size 1"
        return DeviceMesh.from_group(groups, self.device.type, mesh=sub, mesh_dim_names=axes)



