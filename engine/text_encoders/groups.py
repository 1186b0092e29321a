"""Process groups of the text encoders: the ranks of one image, and blocks of them for a split.

The ranks that draw one image are those with one data-parallel coordinate: the mesh is laid out
dp × cfg × ring × ulysses × tp with dp outermost, so they are `world / dp` consecutive ranks. A text
encoder split `d` ways uses blocks of `d` consecutive ranks inside that group (the innermost axes: one
node where the denoiser's own fastest groups are).

`new_group` is collective over the whole world: every rank creates every group, in one order, from
the same plan (decided from configs, identical everywhere). A group spanning the world is the world's.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from shardiff_parallel.mesh import Mesh


def image_ranks(mesh: Mesh) -> list[list[int]]:
    """The global ranks of every image's group, in dp order."""
    per = len(mesh.ranks) // mesh.size("dp")
    return [list(mesh.ranks[i * per:(i + 1) * per]) for i in range(mesh.size("dp"))]


def my_image(mesh: Mesh) -> list[int]:
    return image_ranks(mesh)[mesh.coord("dp")]


class Groups:
    """Groups over blocks of consecutive ranks of each image, created once per block size."""

    def __init__(self, mesh: Mesh, timeout: timedelta):
        self.mesh, self.timeout = mesh, timeout
        self._groups: dict[tuple[int, ...], object] = {}

    def create(self, block: int) -> None:
        """Collective (every rank, same `block`): the groups of `block` consecutive ranks of every image."""
        if block == 1 or not dist.is_initialized():
            return
        for image in image_ranks(self.mesh):
            assert len(image) % block == 0
            for start in range(0, len(image), block):
                members = tuple(image[start:start + block])
                if members in self._groups:
                    continue
                if len(members) == dist.get_world_size():
                    self._groups[members] = dist.group.WORLD
                else:
                    self._groups[members] = dist.new_group(list(members), timeout=self.timeout)

    def mine(self, block: int) -> tuple[list[int], object]:
        """(members, group) of this rank's block of `block` ranks (created before)."""
        image = my_image(self.mesh)
        start = image.index(self.mesh.rank) // block * block
        members = tuple(image[start:start + block])
        return list(members), self._groups[members]

    def device_mesh(self, block: int):
        """A 1-D DeviceMesh over this rank's block (for DTensor `parallelize_module`)."""
        from torch.distributed.device_mesh import DeviceMesh

        members, group = self.mine(block)
        return DeviceMesh.from_group(group, self.mesh.device.type, mesh=members)
