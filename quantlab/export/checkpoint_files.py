"""A checkpoint's tensors as a set of safetensors files: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json`` (transformers'
and vLLM's convention).

Reading (:class:`CheckpointFiles`): every header is checked up front
(:func:`quantlab.export.safetensors_file.read_header`) and, for shards, against the index; the
tensors are then read one at a time from the memory-mapped files.

Writing (:class:`ShardedWriter`): tensors are added one at a time and go straight to disk, so a
writer holds no more than the tensor being added -- a model streamed block by block is exported
as it is quantized. A shard is closed once the next tensor would take it past
``max_shard_bytes``; a checkpoint that fits one shard is a single ``model.safetensors`` with no
index. Within a file the tensors are laid out by element size, largest first, after a header
padded to 8 bytes, so every tensor starts aligned to its element size (what safetensors itself
does, and what a zero-copy memory map needs).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import SafetensorsReader, TensorInfo, read_header
from quantlab.formats.tensor_layout import SAFETENSORS_DTYPES

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointFiles",
    "ShardedWriter",
    "has_weights",
    "parse_size",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' long-standing default for save_pretrained: every loader handles shards this size.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 64 * 1024 * 1024
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(size: str | int | float, what: str = "size") -> int:
    """Bytes of a size: a number of bytes, or a string such as ``"350MB"``, ``"1.5 GiB"``
    (``kB``/``MB``/``GB`` decimal, ``KiB``/``MiB``/``GiB`` binary). ``what`` names the value in
    the error (``"memory budget"``, ``"--max-shard-size"``)."""
    if isinstance(size, bool):
        raise ValueError(f"{what} must be bytes or a size string, got {size!r}")
    if isinstance(size, int | float):
        value = float(size)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"{what} {size!r}: expected a number with an optional unit "
                f"({', '.join(u for u in ('B', 'kB', 'MB', 'GB', 'KiB', 'MiB', 'GiB'))})"
            )
        value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive, finite size, got {size!r}")
    return int(value)


def has_weights(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a single-file or sharded safetensors checkpoint."""
    root = Path(path)
    return (root / SINGLE_FILE).is_file() or (root / INDEX_FILE).is_file()


class CheckpointFiles:
    """The tensors of a checkpoint directory by name (headers checked when this object is made),
    read one at a time from the memory-mapped files. ``tensors`` maps every name to its shape
    and dtype, like a single file's header."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file_of: dict[str, Path] = {}
        self.tensors: dict[str, TensorInfo] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            files = self._read_index(index)
            self.source = index
        elif (self.path / SINGLE_FILE).is_file():
            files = {self.path / SINGLE_FILE: None}
            self.source = self.path / SINGLE_FILE
        else:
            raise CheckpointError(
                f"{self.path}: missing {SINGLE_FILE} (or {INDEX_FILE} and its shards); quantlab "
                "reads safetensors checkpoints only (a pytorch_model.bin would be unpickled)"
            )
        for file, names in files.items():
            header = read_header(file)
            if names is None:
                names = set(header.tensors)
            missing = sorted(names - set(header.tensors))
            if missing:
                raise CheckpointError(
                    f"{file}: {INDEX_FILE} places {len(missing)} tensors in this shard that it "
                    f"does not hold (first: {missing[0]!r}); the checkpoint is incomplete"
                )
            unlisted = sorted(set(header.tensors) - names)
            if unlisted:
                raise CheckpointError(
                    f"{file}: holds {len(unlisted)} tensors {INDEX_FILE} does not list (first: "
                    f"{unlisted[0]!r}); the index and the shards do not belong together"
                )
            for name in names:
                self.tensors[name] = header.tensors[name]
                self._file_of[name] = file
        self.files = sorted(files)
        self._readers: dict[Path, SafetensorsReader] = {}

    def _read_index(self, index: Path) -> dict[Path, set[str]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object")
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file:
                raise CheckpointError(f"{index}: {name!r} maps to {file!r}, not a file name")
            shard = self.path / file
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {file} (holding {name!r}) is missing")
            files.setdefault(shard, set()).add(name)
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (the most common one by bytes)."""
        counts: Counter[torch.dtype] = Counter()
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] += info.nbytes()
        if not counts:
            raise CheckpointError(f"{self.path}: no floating-point tensors")
        return counts.most_common(1)[0][0]

    def nbytes(self, prefix: str = "") -> int:
        """Bytes stored for the tensors whose names start with ``prefix``."""
        return sum(info.nbytes() for name, info in self.tensors.items() if name.startswith(prefix))

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Bytes the tensors take once loaded with float tensors in ``dtype`` (packed integer
        tensors and a quantized layer's own float tensors counted as floats: an upper bound for
        fp32, close for 16-bit dtypes)."""
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                total += math.prod(info.shape) * size
            else:
                total += info.nbytes()
        return total

    def file_names(self) -> list[str]:
        """The names of the files the tensors come from (the index first, when sharded)."""
        index = [INDEX_FILE] if self.source.name == INDEX_FILE else []
        return index + [f.name for f in self.files]

    def _reader(self, name: str) -> SafetensorsReader:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        reader = self._readers.get(file)
        if reader is None:
            reader = SafetensorsReader(file).__enter__()
            self._readers[file] = reader
        return reader

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU in its stored dtype."""
        return self._reader(name).get(name)

    def get_leading(self, name: str, stop: int) -> torch.Tensor:
        """Rows ``[0, stop)`` of the leading dimension of ``name`` (only those bytes are read)."""
        return self._reader(name).get_leading(name, stop)

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` of the leading dimension of ``name`` (only those bytes are read)."""
        return self._reader(name).get_rows(name, rows)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.__exit__(None, None, None)
        self._readers.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FileWriter:
    """One safetensors file written tensor by tensor: each tensor's bytes go to a spill file per
    element size at once; :meth:`close` writes the header and concatenates the spills (largest
    element size first) behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}  # name -> (info, size, offset)
        self._spills: dict[int, tuple[Path, IO[bytes]]] = {}
        self._spill_bytes: Counter[int] = Counter()
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        data = tensor.detach().to("cpu").contiguous()
        size = data.element_size()
        if size not in self._spills:
            spill = self.path.with_name(f".{self.path.name}.spill{size}")
            self._spills[size] = (spill, open(spill, "wb"))  # noqa: SIM115 (closed in close())
        raw = data.reshape(-1).view(torch.uint8).numpy()
        self._spills[size][1].write(memoryview(raw))
        self.entries[name] = (TensorInfo.of(data), size, self._spill_bytes[size])
        self._spill_bytes[size] += raw.nbytes
        self.nbytes += raw.nbytes

    def close(self) -> None:
        base: dict[int, int] = {}
        offset = 0
        for size in sorted(self._spills, reverse=True):
            base[size] = offset
            offset += self._spill_bytes[size]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for name, (info, size, start) in sorted(self.entries.items()):
            begin = base[size] + start
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [begin, begin + info.nbytes()],
            }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for size in sorted(self._spills, reverse=True):
                spill, handle = self._spills[size]
                handle.close()
                with open(spill, "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                spill.unlink()
            out.flush()
            os.fsync(out.fileno())
        self._spills.clear()

    def abort(self) -> None:
        for spill, handle in self._spills.values():
            handle.close()
            spill.unlink(missing_ok=True)
        self._spills.clear()


class ShardedWriter:
    """Write a checkpoint's tensors into ``directory`` as they come (see the module docstring).
    Use as a context manager, or call :meth:`close` (which returns the files written); on an
    exception the partial files are removed (the directory is a temporary one anyway, see
    :func:`quantlab.export.atomic.atomic_directory`)."""

    def __init__(
        self, directory: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._done: list[_FileWriter] = []
        self._current: _FileWriter | None = None
        self._names: set[str] = set()

    def _new_file(self) -> _FileWriter:
        return _FileWriter(self.directory / f".shard-{len(self._done) + 1:05d}.partial")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``name`` (to the current shard, or a new one when it would take
        the current one past the limit)."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._current is None:
            self._current = self._new_file()
        elif self._current.entries and self._current.nbytes + nbytes > self.max_shard_bytes:
            self._current.close()
            self._done.append(self._current)
            self._current = self._new_file()
        self._current.add(name, tensor)
        self._names.add(name)

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def close(self) -> list[str]:
        """Finish the last shard, give the files their final names (``model.safetensors`` alone,
        or ``model-0000i-of-0000N.safetensors`` and the index); returns the file names."""
        if self._current is not None:
            self._current.close()
            self._done.append(self._current)
            self._current = None
        if not self._done:
            raise ValueError("no tensors were written")
        if len(self._done) == 1:
            final = self.directory / SINGLE_FILE
            self._done[0].path.rename(final)
            final.chmod(0o644)
            return [SINGLE_FILE]
        count = len(self._done)
        weight_map: dict[str, str] = {}
        names = []
        total = 0
        for i, shard in enumerate(self._done):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            shard.path.rename(self.directory / name)
            (self.directory / name).chmod(0o644)
            names.append(name)
            total += shard.nbytes
            weight_map.update(dict.fromkeys(shard.entries, name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return [*names, INDEX_FILE]

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current.path.unlink(missing_ok=True)
        for shard in self._done:
            shard.path.unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
