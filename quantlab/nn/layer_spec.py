"""The module spec a quantized layer records in a checkpoint, and the typed readers of its fields.

A layer class of a format (see :mod:`quantlab.nn.registry` for what one provides) reads its spec
with :func:`spec_int`, :func:`spec_bool`, :func:`spec_str` and :func:`spec_int_list`, which refuse
a JSON value of the wrong type (the string ``"false"`` is not a boolean), and raises
:class:`FormatError` for a spec it cannot read. Layer classes import this module; the registry
that lists them imports the layers, so the arrows run registry -> layer -> spec.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["FormatError", "spec_bool", "spec_int", "spec_int_list", "spec_str"]


class FormatError(ValueError):
    """A module spec names a format (or a version of one) this quantlab cannot read."""


_NO_DEFAULT: Any = object()


def _field(spec: Mapping[str, Any], key: str, default: Any) -> Any:
    if key in spec:
        return spec[key]
    if default is _NO_DEFAULT:
        raise FormatError(f"field {key!r} is missing")
    return default


def _wrong_type(key: str, kind: str, value: Any) -> FormatError:
    return FormatError(f"field {key!r} must be {kind}, got {type(value).__name__} {value!r}")


def spec_int(spec: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> int:
    """An integer field of a module spec (a JSON boolean or string is refused)."""
    value = _field(spec, key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong_type(key, "an integer", value)
    return int(value)


def spec_bool(spec: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> bool:
    """A boolean field of a module spec (``"false"`` or ``0`` are refused, not coerced)."""
    value = _field(spec, key, default)
    if not isinstance(value, bool):
        raise _wrong_type(key, "true or false", value)
    return value


def spec_str(spec: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> str:
    value = _field(spec, key, default)
    if not isinstance(value, str):
        raise _wrong_type(key, "a string", value)
    return value


def spec_int_list(spec: Mapping[str, Any], key: str, default: Any = _NO_DEFAULT) -> list[int]:
    value = _field(spec, key, default)
    if not isinstance(value, list | tuple) or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value
    ):
        raise _wrong_type(key, "a list of integers", value)
    return [int(v) for v in value]
