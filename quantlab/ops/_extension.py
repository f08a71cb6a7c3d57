"""Find and load the compiled kernel libraries ``quantlab._C_<family>`` (never compiled on import,
never touches CUDA).

Every kernel family (a directory of ``csrc/``: ``groupwise_int``, ...) is its own shared library,
loaded on first use by the ops module of that family.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

__all__ = [
    "check_built",
    "compiled_kernel",
    "extension_error",
    "extension_loaded",
    "has_kernel",
    "load_extension",
    "register_ops",
]

DEFAULT_FAMILY = "groupwise_int"
_LOADED: dict[str, bool] = {}
_ERRORS: dict[str, str] = {}
_BUILD_HINT = (
    "build it with `python setup.py build_ext --inplace` (or `make setup`); "
    "FORCE_CUDA=1 adds the CUDA kernels"
)


def load_extension(family: str = DEFAULT_FAMILY) -> bool:
    """Load ``quantlab._C_<family>`` once; return whether it is available."""
    if family in _LOADED:
        return _LOADED[family]
    _LOADED[family] = False
    module = f"quantlab._C_{family}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        _ERRORS[family] = f"{module}: {exc}"
        return False
    if spec is None or spec.origin is None:
        _ERRORS[family] = f"{module} is not built; {_BUILD_HINT}"
        return False
    try:
        # A plain shared library registering ops with TORCH_LIBRARY_FRAGMENT; no Python init.
        torch.ops.load_library(spec.origin)
    except OSError as exc:
        _ERRORS[family] = f"could not load {spec.origin}: {exc}; rebuild it ({_BUILD_HINT})"
        return False
    _LOADED[family] = True
    return True


def extension_loaded(family: str = DEFAULT_FAMILY) -> bool:
    return load_extension(family)


def extension_error(family: str = DEFAULT_FAMILY) -> str | None:
    """Why ``family``'s library is unavailable (``None`` when it is loaded)."""
    return None if load_extension(family) else _ERRORS.get(family, "unknown error")


def _dispatch_key(device_type: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type.upper())


def compiled_kernel(kernels: dict[tuple[str, str], bool], op: str, device_type: str) -> bool:
    """Whether ``register_ops`` found a compiled kernel of ``op`` for ``device_type`` (``kernels``
    is its answer; whether the ops *use* it is the kernel policy's decision)."""
    return bool(kernels.get((op, _dispatch_key(device_type))))


def has_kernel(op_name: str, device_type: str, family: str = DEFAULT_FAMILY) -> bool:
    """Whether ``quantlab::<op_name>`` has a kernel for ``device_type`` ("cpu" or "cuda").

    Once the family's ops module is imported every device has one (the reference fills the gaps);
    that module's ``backend`` says whether it is a compiled kernel.
    """
    load_extension(family)
    key = _dispatch_key(device_type)
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"quantlab::{op_name}", key))
    except RuntimeError:  # the op is not defined at all
        return False


def check_built(families: list[str]) -> None:
    """Raise ``RuntimeError`` naming every family in ``families`` whose library does not load."""
    broken = {f: extension_error(f) for f in families if not load_extension(f)}
    if broken:
        raise RuntimeError("; ".join(f"{f}: {err}" for f, err in broken.items()))
    print(f"[setup] kernel libraries loaded: {', '.join(families)}")


# The libraries must outlive their registrations.
_LIBRARIES: list[torch.library.Library] = []


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.quantlab, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_ops(
    family: str, schemas: dict[str, str], references: dict[str, Callable[..., torch.Tensor]]
) -> dict[tuple[str, str], bool]:
    """Load ``family``'s kernel library, define the schemas it did not define, and register each
    PyTorch reference for CPU and CUDA where no compiled kernel exists.

    Returns ``{(op, "CPU" | "CUDA"): compiled}`` for every op in ``references``.
    """
    load_extension(family)
    missing = [name for name in schemas if not _op_defined(name)]
    if missing:
        lib = torch.library.Library("quantlab", "FRAGMENT")
        for name in missing:
            lib.define(schemas[name])
        _LIBRARIES.append(lib)
    impl = torch.library.Library("quantlab", "IMPL")
    kernels: dict[tuple[str, str], bool] = {}
    for name, ref in references.items():
        for key in ("CPU", "CUDA"):
            compiled = has_kernel(name, key, family=family)
            kernels[(name, key)] = compiled
            if not compiled:
                impl.impl(name, ref, key)
    _LIBRARIES.append(impl)
    return kernels
