"""One model group of a server: its supervisor (engine/serve/supervisor.py), its state, the job it runs
and the LoRA adapters it holds fused. The controller owns the queue and decides; a group only says
where it stands.

`python -m engine.serve --replicas R` runs R of them, each of world_size ranks on its own GPUs (its
ranks' CUDA_VISIBLE_DEVICES) with its own rendezvous store, listener and restarts: a group that fails
is restarted alone while the others keep serving.
"""

from __future__ import annotations

from .errors import clean
from .supervisor import Supervisor

class Group:
    def __init__(self, index: int, config, options, emit, devices: tuple[str, ...] | None):
        """`emit(group, event)`: called from the supervisor's thread with its events."""
        self.index = index
        self.label = str(index)
        """The `group` label of its metrics."""
        self.state = "starting"
        """starting → (warming →) ready; restarting → (warming →) ready; failed: given up (others serve on)."""
        self.last_failure: str | None = None
        """The cause of its last failure (shown by /health until it is ready again)."""
        self.target = None
        """engine/request_check.Target of the group once up: what a request is checked against."""
        self.generation = -1
        self.pids: list[int] = []
        self.memory: dict[int, int] = {}
        self.running = None
        """The Job it runs (a user's or a warm-up), or None."""
        self.warmups: list = []
        """Warm-up jobs still to run before it takes requests."""
        self.ever_ready = False
        self.fused: tuple = ()
        """The named adapters fused into its weights, as a Job's lora_key: ((name, scale), …); () none."""
        self.devices = devices
        self.supervisor = Supervisor(
            config=config, world_size=options.world_size, threads=options.threads, emit=lambda e: emit(self, e),
            max_restarts=options.max_restarts, backoff_s=options.restart_backoff_s,
            heartbeat_timeout_s=options.heartbeat_timeout_s, devices=devices,
            name=f"shardiff-supervisor-{index}",
        )

    @property
    def free(self) -> bool:
        """Ready and idle: it can take a request now."""
        return self.state == "ready" and self.running is None

    def up(self, event, target) -> None:
        """A (re)started generation of ranks said Ready: a fresh engine, only the plain LoRAs fused."""
        self.generation, self.pids = event.generation, event.pids
        self.memory = {r.rank: r.memory_bytes for r in event.ready}
        self.target = target
        self.fused = ()

    def health(self) -> dict:
        return {
            "group": self.index,
            "status": self.state,
            "layout": self.target.parallel.describe() if self.target else None,
            "generation": self.generation,
            "workers": list(self.pids),
            "running": int(self.running is not None and not self.running.internal),
            "lora": dict(self.fused),
            **({"devices": list(self.devices)} if self.devices is not None else {}),
            **({"last_failure": clean(self.last_failure)} if self.last_failure and self.state != "ready" else {}),
        }


def group_devices(replicas: int, world_size: int, config) -> list[tuple[str, ...] | None]:
    """The GPUs of each group: consecutive slices of the visible ones (CUDA_VISIBLE_DEVICES, else all),
    world_size each; None for each when the ranks run on the CPU or there is one group (its ranks see the
    host's GPUs, as one server always did)."""
    import os

    from launch import topology

    visible = topology.visible_gpus()
    if replicas == 1 or config.device == "cpu" or visible < replicas * world_size:
        return [None] * replicas
    ids = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = ids[:visible] if ids else [str(i) for i in range(visible)]
    return [tuple(ids[g * world_size:(g + 1) * world_size]) for g in range(replicas)]
