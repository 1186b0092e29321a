"""What the engine does with its text encoders: plan → process groups → components to load → install.

`TextEncoders.preflight` decides the placement before any collective; `setup` makes the groups
(collective); `components` gives the loader what to use instead of loading (None where a rank does not
encode, this rank's shards); `install` wraps the pipeline's encoding methods for `first`.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from .placement import TextPlan, plan_text_encoders

# Sample batches whose layouts a family that lays out per batch (UNets) is asked for: guided or not,
# one image or many. If they all agree, its ranks never regroup.
_SAMPLE_BATCHES = (None, [True], [False], [True] * 64, [False] * 64)


def layout_varies(family, config, world: int) -> bool:
    """Whether `family` regroups its ranks between requests under `config` (its layout follows the batch)."""
    if family.layout is None or world == 1:
        return False
    layouts = set()
    for guided in _SAMPLE_BATCHES:
        try:
            layouts.add(family.layout(world, config, guided)[0])
        except ValueError:
            continue
    return len(layouts) > 1


class TextEncoders:
    """The engine's text encoders: where they live (`plan`), and the work that follows from it."""

    def __init__(self, plan: TextPlan, model, methods: tuple[str, ...]):
        self.plan, self.model, self.methods = plan, model, methods
        self.groups = None
        self.broadcasts: list = []
        """`first`: one wrapper per pipeline that encodes (the loaded one and its img2img / inpainting /
        PAG forms, engine/pipelines.py)."""
        self.image = [0]
        self.mesh = None

    @classmethod
    def preflight(cls, model, config, parallel, *, world: int, explicit_layout: bool, dtype: torch.dtype,
                  gpu_bytes: int | None) -> "TextEncoders":
        """Decide the placement of `model`'s (its description, engine/loading/model.py) text encoders
        (ValueError on a bad one; no collective)."""
        room = None
        if config.text_encoders == "auto" and gpu_bytes is not None:
            from engine.loading.auto_tp import WEIGHT_SHARE

            room = WEIGHT_SHARE * gpu_bytes - model.weight_bytes(parallel.tp, dtype, text_bytes=0, quantize=config.quantize)
        varies = not explicit_layout and layout_varies(model.family, config, world)
        plan = plan_text_encoders(model, config.text_encoders, ranks=parallel.world_size // parallel.dp,
                                  dtype=dtype, room=room, layout_varies=varies)
        return cls(plan, model, model.family.encode_methods)

    @staticmethod
    def bytes_for_room(config, *, ranks: int, dtype: torch.dtype, model=None):
        """`room → text-encoder bytes per rank` for `--tp auto` (engine/loading/auto_tp.choose_tp);
        `model`: config.model's description, where the caller has it."""
        model = model or config.model
        return lambda room: plan_text_encoders(model, config.text_encoders, ranks=ranks, dtype=dtype,
                                               room=room).bytes_per_rank

    def setup(self, mesh, timeout: timedelta) -> None:
        """Collective (every rank): the process groups the placement needs."""
        from .groups import Groups, my_image

        self.mesh = mesh
        self.image = my_image(mesh)
        assert len(self.image) == self.plan.ranks, (self.image, self.plan.ranks)
        self.groups = Groups(mesh, timeout)
        if self.plan.placement == "first":
            self.groups.create(self.plan.ranks)
        elif self.plan.placement == "sharded":
            for degree in sorted(set(self.plan.degrees.values())):
                self.groups.create(degree)

    @property
    def image_rank(self) -> int:
        """This rank's index among the ranks of its image."""
        return self.image.index(self.mesh.rank) if self.mesh is not None else 0

    def components(self, *, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        """Pipeline components to pass to the loader instead of loading them: None for the text
        encoders of a rank that does not encode (`first`), this rank's shards (`sharded`)."""
        if self.plan.placement == "first" and self.image_rank > 0:
            return dict.fromkeys(self.plan.classes)
        if self.plan.placement != "sharded":
            return {}
        from .sharded import load_sharded_text_encoder

        return {name: load_sharded_text_encoder(self.model, name, self.groups.device_mesh(degree), dtype=dtype,
                                                device=device, seed=seed)
                for name, degree in self.plan.degrees.items() if degree > 1}

    def install(self, pipe) -> None:
        """`first`: wrap the pipeline's encoding methods to encode on one rank and broadcast (each
        pipeline made from the same components gets its own wrapper: they are instance methods)."""
        if self.plan.placement == "first":
            from .broadcast import BroadcastEncoding

            _, group = self.groups.mine(self.plan.ranks)
            self.broadcasts.append(BroadcastEncoding(pipe, self.methods, src=self.image[0], group=group,
                                                     device=self.mesh.device))

    def remove(self) -> None:
        for broadcast in self.broadcasts:
            broadcast.remove()
        self.broadcasts.clear()
