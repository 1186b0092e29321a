"""Text encoders off the replicated path: `--text-encoders replicated|first|sharded|auto`.

`placement.py` decides where they live (before any collective, counted from configs), `plans.py`
holds their tensor-parallel plans as data, `sharded.py` loads an encoder holding only its shard,
`broadcast.py` lets one rank encode for the others, `groups.py` makes the process groups, and
`encoders.py` (`TextEncoders`) is what the engine uses. `names.py` is import-light (the CLI's check).
"""

from .names import PLACEMENTS, check_placement

__all__ = ["PLACEMENTS", "check_placement"]
