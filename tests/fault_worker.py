"""A job in which one rank fails on its own: `torchrun --nproc-per-node 2 -m tests.fault_worker`.

Every rank builds the engine (so the process group and the startup check are real), then rank 1 raises
while rank 0 goes on into generate() and blocks in its first collective, waiting for a peer that will
never come. run_main must bring the whole job down quickly with rank 1's message, not hang.
Used by tests/test_cli_errors.py.
"""

from __future__ import annotations

from engine.config import EngineConfig, GenerateRequest
from engine.runtime.distributed import run_main


def main() -> None:
    from engine.driver import Engine

    engine = Engine(EngineConfig(model="flux-tiny", timeout_s=300.0))
    rank = engine.env.rank
    if rank == 1:
        # Built from `rank` so that the traceback's source line does not repeat the message.
        raise RuntimeError(f"injected fault on rank {rank}")
    engine.generate(GenerateRequest(prompt="a fault", steps=2, height=128, width=128))
    engine.close()


if __name__ == "__main__":
    run_main(main)
