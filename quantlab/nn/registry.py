"""The packed-layer formats quantlab can save and load, by name.

The built-in layer classes (``QuantLinear`` for ``groupwise_int``, and one class per other format)
are listed here; a format from outside quantlab joins with :func:`register_layer_format`.
Checkpoint writing, loading (quantlab's own loader and the transformers quantizer) and size
accounting go through this table, so a new format needs no change anywhere else.

A layer class must provide the following (:class:`quantlab.nn.packed_linear.PackedLinear`, the
base of the built-in ones, derives all but ``checkpoint_tensors`` from its format's meta):

* ``format_name: ClassVar[str]`` and ``format_version: ClassVar[int]``;
* ``in_features`` / ``out_features`` attributes;
* ``module_spec(self) -> dict``: the JSON-serialisable encoding stored per module in the
  checkpoint's ``quantization_config["modules"]`` (``format``/``format_version`` are added here);
* ``empty_like(cls, linear: nn.Linear, spec: dict) -> nn.Module`` (classmethod): a layer of
  ``linear``'s shape, bias, device and dtype with zeroed buffers, filled by a state-dict load;
* ``checkpoint_tensors(cls, spec: dict) -> dict[str, str | None]`` (classmethod): the tensor
  suffixes a checkpoint must hold for such a module, each with its safetensors dtype (``"I32"``,
  ``"U8"``, ...) or ``None`` where any float dtype will do (checked before loading);
* ``storage_bits(self) -> int``: bits its packed tensors occupy (bias excluded);
* optionally ``after_load(self) -> None``: fix-ups once the tensors are in (dtype restoring,
  one-time repacking for a kernel) and checks of their values (raise ``ValueError``);
* optionally ``spec_keys: ClassVar[frozenset[str]]``: the fields its spec may hold (besides
  ``format``/``format_version``); a spec with any other field is refused, so a misspelt or
  foreign field is never silently ignored. Read the fields with the typed readers of
  :mod:`quantlab.nn.layer_spec`, which refuse a JSON value of the wrong type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.nn.layer_spec import FormatError
from quantlab.nn.pvq_linear import PVQLinear
from quantlab.nn.ternary_linear import TernaryLinear

__all__ = [
    "check_spec",
    "empty_layer_like",
    "is_quantized",
    "layer_class",
    "module_spec",
    "quantized_modules",
    "quantized_storage",
    "register_layer_format",
    "registered_formats",
]

_FORMATS: dict[str, type[nn.Module]] = {}
_REQUIRED = ("module_spec", "empty_like", "checkpoint_tensors", "storage_bits")


def register_layer_format(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` the layer of its ``format_name``."""
    name = getattr(cls, "format_name", None)
    if not isinstance(name, str) or not isinstance(getattr(cls, "format_version", None), int):
        raise TypeError(f"{cls.__name__} needs format_name: str and format_version: int")
    missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
    if missing:
        raise TypeError(f"{cls.__name__} lacks {missing} required of a quantlab layer format")
    if name in _FORMATS and _FORMATS[name] is not cls:
        raise ValueError(f"format {name!r} is already registered by {_FORMATS[name].__name__}")
    _FORMATS[name] = cls
    return cls


def registered_formats() -> dict[str, type[nn.Module]]:
    return dict(_FORMATS)


for _builtin in (QuantLinear, BitStackLinear, TernaryLinear, PVQLinear):
    register_layer_format(_builtin)


def layer_class(spec: dict[str, Any], default_format: str = "groupwise_int") -> type[nn.Module]:
    """The layer class for a module spec (specs written before per-module formats were recorded
    are ``default_format``, version 1)."""
    formats = registered_formats()
    name = spec.get("format", default_format)
    version = spec.get("format_version", 1)
    if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, int):
        raise FormatError(
            f"format must be a string and format_version an integer, got {name!r} / {version!r}"
        )
    if name not in formats:
        raise FormatError(
            f"unknown quantlab layer format {name!r}; this quantlab reads {sorted(formats)}"
        )
    cls = formats[name]
    if version != cls.format_version:
        raise FormatError(
            f"{name} layout version {version} is not supported (this quantlab reads version "
            f"{cls.format_version})"
        )
    return cls


def check_spec(spec: Any) -> type[nn.Module]:
    """The layer class of a module spec read from a file, after checking the spec completely:
    a JSON object, a known format and version, no field the format does not define, and every
    field of the right JSON type (the class's ``layer_kwargs`` reads them; values that depend
    on the layer's shape are checked when the layer is built). Raises
    :class:`FormatError` naming the problem."""
    if not isinstance(spec, dict):
        raise FormatError(f"a module spec must be a JSON object, got {type(spec).__name__}")
    cls = layer_class(spec)
    allowed = getattr(cls, "spec_keys", None)
    if allowed is not None:
        unknown = sorted(set(spec) - {"format", "format_version"} - set(allowed))
        if unknown:
            raise FormatError(
                f"field(s) {unknown} are not part of the {cls.format_name} format "
                f"(it has {sorted(allowed)})"
            )
    layer_kwargs = getattr(cls, "layer_kwargs", None)
    if layer_kwargs is not None:
        try:
            layer_kwargs(spec)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(str(exc)) from exc
    return cls


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, tuple(registered_formats().values()))


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every module of a registered format inside ``model``."""
    classes = tuple(registered_formats().values())
    for name, module in model.named_modules():
        if isinstance(module, classes):
            yield name, module


def quantized_storage(model: nn.Module) -> tuple[int, int]:
    """(stored bits of the quantized linears inside ``model``, their weight count)."""
    bits = weights = 0
    for _, module in quantized_modules(model):
        bits += module.storage_bits()
        weights += module.in_features * module.out_features
    return bits, weights


def module_spec(module: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about ``module``: its own spec plus format name and version."""
    return {
        "format": module.format_name,
        "format_version": module.format_version,
        **module.module_spec(),
    }


def empty_layer_like(linear: nn.Module, spec: dict[str, Any], name: str = "") -> nn.Module:
    """An empty layer of ``spec``'s format shaped like ``linear`` (an ``nn.Linear``)."""
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name or 'module'} is {type(linear).__name__}, expected nn.Linear")
    return layer_class(spec).empty_like(linear, spec)
