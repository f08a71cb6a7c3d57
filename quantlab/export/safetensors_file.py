"""Reading safetensors files defensively: the header is parsed and checked entry by entry before
any tensor is read, so a truncated, corrupt or hand-edited file is a :class:`CheckpointError`
naming the file and the entry, never a ``KeyError`` or a ``SafetensorError`` from deep inside.

The checks are the format's own rules (safetensors' ``validate``): an 8-byte little-endian header
length, a JSON object, every entry with a known ``dtype``, a ``shape`` of non-negative integers and
``data_offsets`` whose byte range holds exactly ``numel * itemsize`` bytes; the entries tile the
data section without gaps or overlaps and the file ends where the last one ends. ``__metadata__``
is a string-to-string map.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantlab.export.errors import CheckpointError
from quantlab.formats.tensor_layout import SAFETENSORS_DTYPES, dtype_name

__all__ = [
    "SafetensorsHeader",
    "SafetensorsReader",
    "TensorInfo",
    "file_sha256",
    "read_header",
    "read_tensors",
]

# The format caps the header at 100 MB (safetensors' MAX_HEADER_SIZE).
_MAX_HEADER = 100 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor (from a header, or from a tensor in memory)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorInfo:
        return cls(tuple(tensor.shape), tensor.dtype)

    def describe(self) -> str:
        return f"{dtype_name(self.dtype)} {list(self.shape)}"

    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: its tensors by name and its ``__metadata__``."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _entry(path: Path, name: str, raw: Any) -> tuple[TensorInfo, int, int]:
    """One header entry as ``(info, begin, end)``; raise naming the entry if it is malformed."""
    where = f"{path}: header entry {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in raw]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; the file is corrupt, re-export it")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(
        type(s) is int and s >= 0
        for s in shape  # bool is an int subclass; refuse it
    ):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = raw["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {offsets!r} is not [begin, end], begin <= end"
        )
    info = TensorInfo(tuple(shape), SAFETENSORS_DTYPES[dtype])
    want = math.prod(shape) * torch.empty((), dtype=info.dtype).element_size()
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(
            f"{where}: {dtype} {shape} needs {want} bytes, data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return info, offsets[0], offsets[1]


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file ``path`` (nothing else is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)"
            )
        text = f.read(header_len)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    # The tensors must tile the data section exactly (safetensors refuses gaps and overlaps).
    end = 0
    for name, (_, begin, stop) in sorted(entries.items(), key=lambda kv: kv[1][1:]):
        if begin != end:
            raise CheckpointError(
                f"{path}: header entry {name!r} starts at byte {begin} of the data, expected {end} "
                "(overlapping or missing tensor data); the file is corrupt"
            )
        end = stop
    data = size - 8 - header_len
    if end > data:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {size} bytes, header promises "
            f"{8 + header_len + end}"
        )
    if end < data:
        raise CheckpointError(
            f"{path}: {data - end} bytes after the last tensor the header describes; the file is "
            "corrupt or was appended to"
        )
    return SafetensorsHeader(path, {name: e[0] for name, e in entries.items()}, metadata)


class SafetensorsReader:
    """An open safetensors file whose header :func:`read_header` accepted, read one tensor (or
    one slice of the leading dimension) at a time, so a loader holds one tensor beyond the model
    at any moment. Use as a context manager; read failures are :class:`CheckpointError`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def __enter__(self) -> SafetensorsReader:
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._handle.__enter__()
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: unreadable safetensors file: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.__exit__(*exc)
        self._handle = None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: cannot read {key}: {exc}") from exc

    def get_leading(self, key: str, stop: int) -> torch.Tensor:
        """Rows ``[0, stop)`` of the leading dimension of ``key`` (only those bytes are read)."""
        try:
            return self._handle.get_slice(key)[:stop]
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: cannot read {key}[:{stop}]: {exc}") from exc

    def get_rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (any order) of the leading dimension of ``key``; only their bytes are
        read."""
        try:
            view = self._handle.get_slice(key)
            return torch.cat([view[r : r + 1] for r in rows])
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: cannot read rows of {key}: {exc}") from exc


def read_tensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors ``names`` (default: all) of a file whose header :func:`read_header` accepted,
    on the CPU; a read failure is a :class:`CheckpointError` naming the file."""
    with SafetensorsReader(path) as reader:
        keys = reader.keys() if names is None else list(names)
        return {key: reader.get(key) for key in keys}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed (constant memory whatever the file's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
