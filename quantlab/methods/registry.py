"""The quantization methods by name: the seven built-in ones and any registered later.

:func:`quantlab.pipeline.quantize_model`, :func:`quantlab.quantize`, config round trips
(:func:`config_from_dict`) and the CLI look methods up here. Each built-in method's module
defines its :class:`~quantlab.methods.base.Method` as ``METHOD``; this module imports them, so
the arrows run registry -> method -> base and a method never needs the table it is listed in.
A method from outside quantlab joins with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quantlab.methods.awq.method import METHOD as AWQ
from quantlab.methods.base import Method
from quantlab.methods.bitstack.method import METHOD as BITSTACK
from quantlab.methods.fair_gptq import METHOD as FAIR_GPTQ
from quantlab.methods.gptq import METHOD as GPTQ
from quantlab.methods.pvq import METHOD as PVQ
from quantlab.methods.rtn import METHOD as RTN
from quantlab.methods.ternary import METHOD as TERNARY

__all__ = ["config_from_dict", "get_method", "methods", "register_method"]

# In the order the CLI lists them.
_METHODS: dict[str, Method] = {
    method.name: method for method in (RTN, GPTQ, AWQ, BITSTACK, TERNARY, FAIR_GPTQ, PVQ)
}


def register_method(method: Method) -> Method:
    """Add a method from outside quantlab (a name already taken by another method is refused)."""
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    return dict(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a method config from its ``to_dict()`` output (any registered method)."""
    data = dict(data)
    method = data.pop("method", None)
    version = data.pop("version", 1)
    if method not in _METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(_METHODS)}")
    cls = _METHODS[method].config_cls
    if version != cls.version:
        raise ValueError(
            f"{method} config version {version} is not supported (expected {cls.version})"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {method} config fields: {sorted(unknown)}")
    # JSON has no tuples; every sequence field of a frozen config is a tuple.
    for f in dataclasses.fields(cls):
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)
