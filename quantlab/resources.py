"""Peak memory of a run: the host's resident set (RSS) and, on a GPU, the device's allocations.

The host figure is the kernel's high-water mark of this process (``VmHWM``), reset at the start
of the measured span where Linux allows it (writing ``5`` to ``/proc/self/clear_refs``), so a
run inside a longer-lived process reports its own peak; where the reset is not possible the
figure is the process's peak since it started, and :attr:`PeakMemory.since_process_start` says
so.
"""

from __future__ import annotations

import resource
from pathlib import Path
from types import TracebackType

import torch

__all__ = [
    "PeakMemory",
    "available_memory_bytes",
    "current_rss_bytes",
    "free_device_memory_bytes",
    "peak_rss_bytes",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """This process's resident memory now (None where /proc is unavailable)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> tuple[int, bool]:
    """This process's peak resident memory: (bytes, whether it counts from the process's start).

    The kernel's high-water mark (``VmHWM``) counts from the last reset by :class:`PeakMemory`;
    without /proc it is ``ru_maxrss``, which always counts from the start of the process."""
    high_water = _status_bytes("VmHWM")
    if high_water is not None:
        return high_water, False
    # Linux reports ru_maxrss in KiB (macOS in bytes; /proc is missing there anyway).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, True


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (``MemAvailable``);
    None where /proc is unavailable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_device_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA ``device`` as the driver reports it; None for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


class PeakMemory:
    """Measures the peak host RSS and peak device memory over a ``with`` block."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.since_process_start = False
        self.rss_bytes: int | None = None
        self.device_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.since_process_start = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.rss_bytes, from_start = peak_rss_bytes()
        self.since_process_start = self.since_process_start or from_start
        if self.device.type == "cuda":
            self.device_bytes = int(torch.cuda.max_memory_allocated(self.device))
