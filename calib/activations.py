"""Where the activations between decoder blocks live: in RAM up to a budget, beyond it in files
under an offload directory, read back memory-mapped one batch at a time.

Block-by-block calibration keeps every calibration sequence's hidden states between two blocks
(a 70B model with 128 x 2048 tokens holds 4 GiB per copy in bf16, and a block's inputs and
outputs coexist). :class:`ActivationStore` takes each batch's tensor as it is produced
(:meth:`~ActivationStore.put`): while the resident total stays within ``budget_bytes`` the tensor
stays in RAM (on the CPU); past it, the tensor's bytes are written to a file of their own under
``offload_dir`` and a :class:`SpilledTensor` stands in for it, whose :meth:`~SpilledTensor.load`
maps the file back (``torch.from_file``) when the batch is used. Files go when their tensor does
(and the whole directory when the store is closed), so an interrupted run leaves nothing behind
but an empty directory it names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import Union

import torch

__all__ = ["Activation", "ActivationStore", "SpilledTensor", "materialize"]


class SpilledTensor:
    """A tensor's bytes in a file of its own; :meth:`load` maps them back as a CPU tensor."""

    def __init__(self, tensor: torch.Tensor, directory: Path) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.nbytes = tensor.numel() * tensor.element_size()
        fd, name = tempfile.mkstemp(dir=directory, prefix="activation-", suffix=".bin")
        self.path = Path(name)
        # The file goes with this object, whatever ends its life.
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        with os.fdopen(fd, "wb") as f:
            tensor.view(torch.uint8).reshape(-1).numpy().tofile(f)

    def load(self) -> torch.Tensor:
        """The tensor, memory-mapped from its file (pages read as they are touched)."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        raw = torch.from_file(str(self.path), shared=False, size=self.nbytes, dtype=torch.uint8)
        return raw.view(self.dtype).view(self.shape)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


Activation = Union[torch.Tensor, SpilledTensor]  # noqa: UP007 - a runtime alias


def materialize(value: Activation) -> torch.Tensor:
    """The tensor itself (a spilled one read back)."""
    return value.load() if isinstance(value, SpilledTensor) else value


class ActivationStore:
    """Keeps activations in RAM up to ``budget_bytes`` (``None``: no limit), spills the rest
    under ``offload_dir``; without an offload directory, going past the budget is an error that
    names both figures. Use as a context manager (or call :meth:`close`) to remove the spill
    directory."""

    def __init__(
        self, budget_bytes: int | None = None, offload_dir: str | os.PathLike[str] | None = None
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"activation budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        self._spill_dir: Path | None = None
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.spilled_bytes = 0  # currently on disk
        self.peak_spilled_bytes = 0
        self.written_bytes = 0  # ever written

    def _spill_directory(self) -> Path:
        if self._spill_dir is None:
            assert self.offload_dir is not None
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(
                tempfile.mkdtemp(prefix="quantlab-activations-", dir=self.offload_dir)
            )
        return self._spill_dir

    def put(self, tensor: torch.Tensor) -> Activation:
        """Keep ``tensor`` (moved to the CPU) within the budget, or spill it."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.budget_bytes is None or self.resident_bytes + nbytes <= self.budget_bytes:
            kept = tensor.detach().to("cpu")
            self.resident_bytes += nbytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            weakref.finalize(kept, self._released, nbytes, False)
            return kept
        if self.offload_dir is None:
            raise MemoryError(
                f"the activations between blocks need more than the {_gib(self.budget_bytes)} "
                f"activation budget ({_gib(self.resident_bytes)} held, {_gib(nbytes)} more); give "
                "an offload directory (--offload-dir) to spill them to disk, or raise the budget"
            )
        spilled = SpilledTensor(tensor, self._spill_directory())
        self.spilled_bytes += nbytes
        self.written_bytes += nbytes
        self.peak_spilled_bytes = max(self.peak_spilled_bytes, self.spilled_bytes)
        weakref.finalize(spilled, self._released, nbytes, True)
        return spilled

    def _released(self, nbytes: int, spilled: bool) -> None:
        if spilled:
            self.spilled_bytes -= nbytes
        else:
            self.resident_bytes -= nbytes

    def stats(self) -> dict[str, int | None]:
        return {
            "budget_bytes": self.budget_bytes,
            "peak_resident_bytes": self.peak_resident_bytes,
            "peak_spilled_bytes": self.peak_spilled_bytes,
            "spilled_written_bytes": self.written_bytes,
        }

    def close(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"
