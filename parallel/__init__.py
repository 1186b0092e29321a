"""Parallel layouts: degrees, the mesh, sequence sharding, Ulysses, Ring, and applying model plans."""

from .attention import ParallelAttention
from .config import AXES, ParallelConfig, resolve_degrees
from .mesh import Mesh
from .sharding import gather_pieces, split_sizes, take_piece

__all__ = [
    "AXES", "Mesh", "ParallelAttention", "ParallelConfig", "gather_pieces", "resolve_degrees",
    "split_sizes", "take_piece",
]
