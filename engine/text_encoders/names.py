"""The placements' names and their check, with no heavy import (the CLI and EngineConfig use it)."""

PLACEMENTS = ("auto", "replicated", "first", "sharded")


def check_placement(value: str) -> None:
    if value not in PLACEMENTS:
        raise ValueError(f"--text-encoders must be {', '.join(PLACEMENTS[:-1])} or {PLACEMENTS[-1]}, got {value!r}")
