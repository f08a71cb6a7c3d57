"""Which implementation a kernel family's ops run on a device, and why.

* **CPU**: the compiled kernels whenever the family's library is built (CI runs their tests on
  every change); the PyTorch reference otherwise, with a one-time warning.
* **CUDA**: a compiled kernel is the default only once a run on a real GPU has verified it: a
  record in ``quantlab/ops/verified_kernels.json`` (written by
  ``scripts/record_verified_kernels.py`` from a ``scripts/gpu_session.sh`` run) whose source
  digest equals the digest of the sources this build compiled (``quantlab/_kernel_build.json``,
  written by setup.py) and whose GPU has this device's compute capability. Without one, the ops
  take the torch path (dequantize + cuBLAS, or the family's reference) and warn once, naming the
  reason.
  ``QUANTLAB_CUDA_KERNELS=1`` opts in to unverified kernels, ``=0`` forces the torch path.

Decisions are made once per (family, device type) and cached; :func:`backends_used` lists those
the process actually ran, for the CLI's summary and ``--json``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.ops.kernel_sources import read_build_record

__all__ = [
    "ENV_VAR",
    "VERIFIED_RECORD",
    "KernelPathWarning",
    "PathDecision",
    "backends_used",
    "decide",
    "warn_once",
    "read_verified_record",
    "reset",
    "reset_usage",
    "use_kernel",
]

ENV_VAR = "QUANTLAB_CUDA_KERNELS"
VERIFIED_RECORD = Path(__file__).resolve().parent / "verified_kernels.json"
KERNEL = {"cpu": "cpu-kernel", "cuda": "cuda-kernel"}
TORCH = "torch"


class KernelPathWarning(RuntimeWarning):
    """A family's ops run on a slower path than the device could have (filterable)."""


@dataclass(frozen=True)
class PathDecision:
    family: str
    device_type: str
    backend: str  # "cpu-kernel", "cuda-kernel" or "torch"
    reason: str

    @property
    def kernel(self) -> bool:
        return self.backend != TORCH


_DECISIONS: dict[tuple[str, str], PathDecision] = {}
_USED: dict[tuple[str, str], str] = {}
_WARNED: set[str] = set()


def reset() -> None:
    """Forget every decision (tests change the environment or the records between cases)."""
    _DECISIONS.clear()
    _USED.clear()
    _WARNED.clear()


def warn_once(key: str, message: str) -> None:
    """A :class:`KernelPathWarning` the first time ``key`` is seen in this process (a layer that
    takes a slower path than the device offers, for a reason the caller names)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, KernelPathWarning, stacklevel=3)


def reset_usage() -> None:
    """Start a new run's :func:`backends_used` without re-deciding (or re-warning)."""
    _USED.clear()


def backends_used() -> dict[str, dict[str, str]]:
    """``{family: {device_type: backend}}`` for every family whose ops ran since the last reset."""
    used: dict[str, dict[str, str]] = {}
    for (family, device_type), backend in sorted(_USED.items()):
        used.setdefault(family, {})[device_type] = backend
    return used


def read_verified_record(path: Path = VERIFIED_RECORD) -> dict[str, list[dict[str, str]]]:
    """``{family: [verification, ...]}`` from the tracked record (an empty record is valid)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path} is unreadable: {exc}") from exc
    families = record.get("families") if isinstance(record, dict) else None
    if not isinstance(families, dict):
        raise RuntimeError(f"{path} has no 'families' object")
    return families


def _opt_in() -> bool | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 (run unverified CUDA kernels) or 0 (never)")
    return value == "1"


def _capability() -> str | None:
    """The current CUDA device's compute capability ("9.0"), ``None`` without a visible device."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _decide_cuda(family: str, compiled: bool) -> PathDecision:
    def torch_path(reason: str) -> PathDecision:
        return PathDecision(family, "cuda", TORCH, reason)

    if not compiled:
        return torch_path(
            f"this build has no CUDA kernels for {family} (rebuild with FORCE_CUDA=1 and nvcc)"
        )
    opt_in = _opt_in()
    if opt_in is False:
        return torch_path(f"{ENV_VAR}=0")
    capability = _capability()
    if capability is None:
        return torch_path("no CUDA device is visible")
    built = read_build_record().get(family, {})
    digest = str(built.get("cuda_sources_sha256", "")) if isinstance(built, dict) else ""
    for entry in read_verified_record().get(family, []):
        same_source = bool(digest) and entry.get("cuda_sources_sha256") == digest
        if same_source and entry.get("compute_capability") == capability:
            where = f"{entry.get('device')}, {entry.get('date')}, commit {entry.get('commit')}"
            return PathDecision(family, "cuda", KERNEL["cuda"], f"verified ({where})")
    if opt_in:
        return PathDecision(
            family, "cuda", KERNEL["cuda"], f"{ENV_VAR}=1 (not verified on a GPU for this source)"
        )
    why = (
        "no build record (quantlab/_kernel_build.json) to match against"
        if not digest
        else f"no GPU run has verified these sources (sha256 {digest[:12]}) on a "
        f"compute-capability {capability} device"
    )
    return torch_path(f"{why}; see {VERIFIED_RECORD.name}, or set {ENV_VAR}=1 to use them")


def decide(family: str, device_type: str, compiled: bool) -> PathDecision:
    """The path ``family``'s ops take on ``device_type`` given whether a compiled kernel exists;
    cached, and warned about once where it is not the compiled kernel (or is an unverified one)."""
    key = (family, device_type)
    decision = _DECISIONS.get(key)
    if decision is None:
        if device_type == "cuda":
            decision = _decide_cuda(family, compiled)
        elif compiled:
            decision = PathDecision(family, device_type, KERNEL.get(device_type, "kernel"), "")
        else:
            decision = PathDecision(
                family, device_type, TORCH, f"the {family} kernel library is not built"
            )
        _DECISIONS[key] = decision
        if decision.reason and not decision.reason.startswith("verified"):
            path = "CUDA kernels" if decision.kernel else "the torch path (PyTorch reference ops)"
            warnings.warn(
                f"quantlab {family} ops on {device_type}: running {path} because {decision.reason}",
                KernelPathWarning,
                stacklevel=3,
            )
    _USED[key] = decision.backend
    return decision


@torch.compiler.assume_constant_result
def use_kernel(family: str, device_type: str, compiled: bool) -> bool:
    """Whether the compiled kernel runs (a constant while tracing: the decision is per process)."""
    return decide(family, device_type, compiled).kernel
