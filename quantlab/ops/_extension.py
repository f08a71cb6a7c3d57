"""Find and load the compiled ``quantlab._C`` library (never compiled on import, never touches
CUDA)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["extension_error", "extension_loaded", "has_kernel", "load_extension"]

_STATE: dict[str, object] = {"loaded": False, "error": None, "tried": False}
_BUILD_HINT = (
    "build it with `python setup.py build_ext --inplace` (or `make setup`); "
    "FORCE_CUDA=1 adds the CUDA kernels"
)


def load_extension() -> bool:
    """Load ``quantlab._C`` once; return whether it is available."""
    if _STATE["tried"]:
        return bool(_STATE["loaded"])
    _STATE["tried"] = True
    try:
        spec = importlib.util.find_spec("quantlab._C")
    except (ImportError, ValueError) as exc:
        spec = None
        _STATE["error"] = str(exc)
    if spec is None or spec.origin is None:
        _STATE["error"] = _STATE["error"] or f"quantlab._C is not built; {_BUILD_HINT}"
        return False
    try:
        # A plain shared library registering ops with TORCH_LIBRARY; it has no Python module init.
        torch.ops.load_library(spec.origin)
    except OSError as exc:
        _STATE["error"] = f"could not load {spec.origin}: {exc}; rebuild it ({_BUILD_HINT})"
        return False
    _STATE["loaded"] = True
    return True


def extension_loaded() -> bool:
    return load_extension()


def extension_error() -> str | None:
    """Why the extension is unavailable (``None`` when it is loaded)."""
    load_extension()
    return None if _STATE["loaded"] else str(_STATE["error"])


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``quantlab::<op_name>`` has a kernel for ``device_type`` ("cpu" or "cuda").

    Once :mod:`quantlab.ops.groupwise_int` is imported every device has one (the reference fills
    the gaps); ask :func:`quantlab.ops.groupwise_int.backend` whether it is a compiled kernel.
    """
    load_extension()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type)
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"quantlab::{op_name}", key))
    except RuntimeError:  # the op is not defined at all
        return False
