"""The messages between the controller and its workers: one socket per rank (multiprocessing.connection,
pickled, authenticated by a per-server key), never a collective.

Controller → every rank: Run, Cancel, Exit. Rank → controller: Hello (once connected), Heartbeat (every
`heartbeat_s`, from its own thread: a rank that stops sending them is hung), Ready (engine loaded),
Partial (a streamed request's partial image, first rank), Finished (a Run ended, one way or another),
Failed (this rank is going down).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    """What a spawned worker needs to join the group and reach the controller."""

    config: object
    """EngineConfig (the same on every rank)."""
    world_size: int
    controller: tuple[str, int]
    """Address of the controller's listener."""
    authkey: bytes
    store: tuple[str, int]
    """The TCPStore the controller hosts for this generation's rendezvous (torch's agent-store form)."""
    generation: int
    """How many times the group was (re)started before this one."""
    threads: int
    """torch intra-op threads per rank."""
    heartbeat_s: float = 1.0
    """Seconds between two Heartbeats."""
    loopback: bool = True
    """Every rank runs on this host: the collective libraries' sockets bind the loopback interface."""
    devices: tuple[str, ...] | None = None
    """The group's GPUs (its ranks' CUDA_VISIBLE_DEVICES: several groups on one host each get their own);
    None: the host's, as inherited."""


@dataclass(frozen=True)
class Hello:
    rank: int
    pid: int


@dataclass(frozen=True)
class Ready:
    rank: int
    layout: object
    """The ParallelConfig the engine resolved (the controller checks that every rank has the same)."""
    tp_note: str
    memory_bytes: int
    """What this rank can still allocate once loaded (engine/request_check.available_bytes)."""
    device: str
    dtype: str


@dataclass(frozen=True)
class Heartbeat:
    rank: int


@dataclass(frozen=True)
class Run:
    job_id: str
    requests: list
    """Complete GenerateRequests (seed, size filled in): every rank runs exactly these."""
    output_type: str = "pil"
    encoding: object = None
    """An engine.serve.encode.Encoding: the first rank sends the images as encoded files (Encoded);
    None: as the pipeline returns them (GenerateResults, the in-process client's)."""
    previews: object = None
    """An engine.serve.preview.Previews: partial images to stream; None: none."""
    loras: tuple | None = None
    """Every LoRA to have fused for this run (LoraSpecs: the server's plain ones, then the request's named
    adapters); a rank whose fused set differs switches first (Engine.set_loras). None: as they are."""


@dataclass(frozen=True)
class Encoded:
    """One image of a Run with an encoding: its file, base64, and its parameters."""

    b64: str
    params: dict
    seconds: float


@dataclass(frozen=True)
class Partial:
    rank: int
    job_id: str
    index: int
    """0, 1, … in step order."""
    b64: str


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Finished:
    rank: int
    job_id: str
    outcome: str
    """"done", "stopped" (an agreed stop: cancel or deadline), "rejected" (a user mistake every rank saw)."""
    results: list | None = None
    """GenerateResults (or Encoded, for a Run with an encoding), on the first rank of a "done" job."""
    message: str = ""
    memory_bytes: int | None = None
    seconds: float = 0.0
    """Wall time of generate_batch on this rank."""
    encode_seconds: float = 0.0
    """Wall time of encoding the images (a Run with an encoding, first rank)."""
    lora_seconds: float = 0.0
    """Wall time of switching the fused LoRAs before generate_batch (0: no switch)."""


@dataclass(frozen=True)
class Failed:
    rank: int
    cause: str
    """"out_of_memory", "exception", "startup"; the group cannot go on."""
    message: str
    user_error: bool = False
    """A mistake in the server's own configuration (layout, model), found by every rank at startup."""
    job_id: str | None = None
