"""Read tensors, or slices of them, from .safetensors files, asking for exactly the slice's bytes.

`safetensors.safe_open(...).get_slice(name)[...]` memory-maps the file and copies out only the
elements a slice covers, so a TP rank keeping 1/T of a weight reads about 1/T of its bytes. Every
contiguous run asked for is counted (`bytes_read`, and with `record_ranges` each run as (tensor,
first byte, end byte) within that tensor's data), which is how the tests check that a rank reads
exactly its shard.

Handles one file or a sharded checkpoint (`*.safetensors.index.json` with a weight_map).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from shardiff_parallel.tensor import Slice

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def weight_files(folder: Path, weights_name: str) -> list[Path]:
    """The safetensors files of one component: the index's weight_map, or the single file."""
    index = folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = [f"{weights_name}.safetensors"]
    return [folder / n for n in names]


def stored_numel(path: Path) -> int:
    """Elements stored in one safetensors file, from its header alone."""
    with safe_open(path, framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


@dataclass
class SafetensorsSlices:
    folder: Path
    weights_name: str = "diffusion_pytorch_model"
    record_ranges: bool = False
    bytes_read: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    """(tensor name, first byte, end byte) of every contiguous run asked for, when record_ranges."""

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.entries: dict[str, TensorEntry] = {}
        self._handles: dict[str, object] = {}
        for path in weight_files(self.folder, self.weights_name):
            if not path.is_file():
                raise ValueError(f"{self.folder}: weights file {path.name} is missing")
            handle = safe_open(path, framework="pt")
            for key in handle.keys():
                meta = handle.get_slice(key)
                if meta.get_dtype() not in DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {meta.get_dtype()}")
                self.entries[key] = TensorEntry(path, DTYPES[meta.get_dtype()], tuple(meta.get_shape()))
                self._handles[key] = handle

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, sl: Slice | None = None) -> torch.Tensor:
        """The tensor `name` (or its slice `sl`), in the file's dtype, on CPU."""
        if name not in self.entries:
            raise ValueError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        e = self.entries[name]
        if sl is None or not e.shape:
            self._count(name, e, 0, [(0, e.shape[0] if e.shape else 1)])
            return self._handles[name].get_tensor(name)
        self._count(name, e, sl.dim, sl.runs)
        view = self._handles[name].get_slice(name)
        lead = (slice(None),) * sl.dim
        return torch.cat([view[(*lead, slice(start, start + n))] for start, n in sl.runs], dim=sl.dim)

    def _count(self, name: str, e: TensorEntry, dim: int, runs) -> None:
        # Row-major: narrowing `dim` asks for prod(shape[:dim]) contiguous byte runs per slice run.
        item = e.dtype.itemsize
        outer = math.prod(e.shape[:dim])
        inner = math.prod(e.shape[dim + 1 :]) * item
        row = (e.shape[dim] if e.shape else 1) * inner
        for start, n in runs:
            self.bytes_read += outer * n * inner
            if self.record_ranges:
                self.ranges.extend((name, o * row + start * inner, o * row + (start + n) * inner) for o in range(outer))
