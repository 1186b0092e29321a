"""Process-group setup, the startup agreement check, and failing fast on every rank.

Three rules from users' bug reports: (1) every group has a timeout, so a dead peer ends a job in
minutes, not after NCCL's 30; (2) user mistakes are found before any model work, reported once, and
every rank exits non-zero; (3) all ranks must be running the same request — a rank started with other
arguments would deadlock or, worse, silently produce a different image.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size from the launcher's environment (torchrun sets WORLD_SIZE), without any collective."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device: str | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                    "launch at most that many processes per node"
                )
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: torch.device, timeout: timedelta) -> DistEnv:
    """Join the job's process group (if launched by torchrun) on NCCL for CUDA, gloo for CPU.

    The default group carries both backends (`cpu:gloo,cuda:nccl`) so that the small object exchanges
    of the startup check go over gloo and never wake NCCL.
    """
    world = launched_world_size()
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree(what: str, payload, error: str | None = None) -> None:
    """Check that every rank holds the same `payload`, and share each rank's preflight `error`.

    One small collective: all ranks learn every rank's error, so a mistake seen on any rank (a model
    folder missing on one node) stops all of them with the same readable message, instead of leaving
    the others blocked in the first NCCL collective.
    """
    if not dist.is_initialized():
        if error:
            raise UserError(error)
        return
    mine = (fingerprint(payload), error)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    errors: dict[str, list[int]] = {}
    for rank, (_, err) in enumerate(everyone):
        if err:
            errors.setdefault(err, []).append(rank)
    if errors:
        raise UserError("\n".join(f"{msg} (rank{'s' if len(r) > 1 else ''} {_ranges(r)})" for msg, r in errors.items()))
    prints = {fp for fp, _ in everyone}
    if len(prints) > 1:
        groups: dict[str, list[int]] = {}
        for rank, (fp, _) in enumerate(everyone):
            groups.setdefault(fp, []).append(rank)
        raise UserError(
            f"the ranks disagree on the {what}: "
            + "; ".join(f"ranks {_ranges(r)} have version {fp}" for fp, r in groups.items())
            + ". Start every rank with the same arguments."
        )


class UserError(ValueError):
    """A mistake in what the user asked for, already known to every rank: printed once, no traceback."""


def _ranges(ranks: list[int]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def run_main(main) -> None:
    """Run `main()`; on failure print once and exit non-zero on every rank without hanging.

    A UserError is known to all ranks (it came out of `agree`), so only rank 0 prints it. Any other
    exception is this rank's own: it prints with its rank, and the process exits at once with
    os._exit — a normal exit would run atexit handlers that may wait on peers — so torchrun sees
    the failure and tears the other ranks down.
    """
    rank = int(os.environ.get("RANK", "0"))
    try:
        main()
    except UserError as e:
        if rank == 0:
            print(f"shardiff: error: {e}", file=sys.stderr, flush=True)
        else:
            # Leave rank 0 time to print: a rank that exits first makes torchrun stop the others,
            # rank 0 possibly before its message is out. Rank 0's own exit ends this wait early.
            time.sleep(10)
        os._exit(2)
    except ValueError as e:
        print(f"shardiff: error{f' on rank {rank}' if launched_world_size() > 1 else ''}: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except KeyboardInterrupt:
        os._exit(130)
    except SystemExit as e:
        # A deliberate exit (argparse's --help), not a crash: no traceback, keep its status.
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else int(e.code is not None))
    except BaseException:
        prefix = f"[rank {rank}] " if launched_world_size() > 1 else ""
        print(prefix + traceback.format_exc().replace("\n", "\n" + prefix), file=sys.stderr, flush=True)
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
