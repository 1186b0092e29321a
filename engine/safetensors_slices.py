"""Read slices of tensors from .safetensors files, touching only the bytes of those slices.

A safetensors file is an 8-byte header length, a JSON header (name → dtype, shape, byte offsets) and
the raw row-major data. The file is memory-mapped (copy-on-write, never written), so a slice copied
out of it makes the OS read only the pages under that slice: a TP rank keeping 1/T of a weight reads
about 1/T of its bytes. Every contiguous byte run handed out is counted (`bytes_read`, optionally
`ranges`), which is how tests check that a rank read exactly its shard.

Handles one file or a sharded checkpoint (`*.safetensors.index.json` with a weight_map).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.tensor import Slice

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
    begin: int
    """Absolute byte offset of the tensor's data in `file`."""


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset where the data section starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


@dataclass
class SafetensorsSlices:
    folder: Path
    weights_name: str = "diffusion_pytorch_model"
    record_ranges: bool = False
    bytes_read: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    """(file name, start, end) of every contiguous run read, when record_ranges."""

    def __post_init__(self):
        self.folder = Path(self.folder)
        index = self.folder / f"{self.weights_name}.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [f"{self.weights_name}.safetensors"]
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ValueError(f"{self.folder}: weights file {name} is missing")
            header, data_start = read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
                self.entries[key] = TensorEntry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                                data_start + meta["data_offsets"][0])
        self._maps: dict[Path, torch.Tensor] = {}

    def _bytes(self, path: Path) -> torch.Tensor:
        if path not in self._maps:
            with open(path, "rb") as f:
                # ACCESS_COPY: a private, writable mapping (torch.frombuffer wants writable memory);
                # nothing is ever written back to the file.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[path] = torch.frombuffer(mm, dtype=torch.uint8)
        return self._maps[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, sl: Slice | None = None) -> torch.Tensor:
        """The tensor `name` (or its slice `sl`), copied out of the file, in the file's dtype, on CPU."""
        if name not in self.entries:
            raise ValueError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        e = self.entries[name]
        item = torch.empty((), dtype=e.dtype).element_size()
        numel = math.prod(e.shape)
        raw = self._bytes(e.file)[e.begin : e.begin + numel * item]
        full = (raw.view(e.dtype) if e.begin % item == 0 else raw.clone().view(e.dtype)).view(e.shape)
        runs = [(0, e.shape[0] if e.shape else 1)] if sl is None else list(sl.runs)
        dim = 0 if sl is None else sl.dim
        # Row-major: narrowing `dim` gives prod(shape[:dim]) contiguous byte runs per slice run.
        outer = math.prod(e.shape[:dim])
        inner = math.prod(e.shape[dim + 1 :]) * item
        row = (e.shape[dim] if e.shape else 1) * inner
        for start, n in runs:
            self.bytes_read += outer * n * inner
            if self.record_ranges:
                for o in range(outer):
                    first = e.begin + o * row + start * inner
                    self.ranges.append((e.file.name, first, first + n * inner))
        if sl is None:
            return full.clone()
        return sl.take(full).contiguous() if len(runs) > 1 else full.narrow(dim, *runs[0]).clone()
