"""The packed-layer formats quantlab can save and load, by name.

Every quantized layer class (``QuantLinear`` for ``groupwise_int``, and one class per other format)
registers itself here with :func:`register_layer_format`. Checkpoint writing, loading (quantlab's
own loader and the transformers quantizer) and size accounting go through this table, so a new
format needs no change anywhere else.

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
  one-time repacking for a kernel).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = [
    "FormatError",
    "empty_layer_like",
    "is_quantized",
    "layer_class",
    "module_spec",
    "quantized_modules",
    "register_layer_format",
    "registered_formats",
]

# Modules that define (and on import register) the built-in layer formats.
_BUILTIN = (
    "quantlab.nn.linear",
    "quantlab.nn.bitstack_linear",
    "quantlab.nn.ternary_linear",
    "quantlab.nn.pvq_linear",
)
_FORMATS: dict[str, type[nn.Module]] = {}
_REQUIRED = ("module_spec", "empty_like", "checkpoint_tensors", "storage_bits")


class FormatError(ValueError):
    """A module spec names a format (or a version of one) this quantlab cannot read."""


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


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def registered_formats() -> dict[str, type[nn.Module]]:
    _load_builtin()
    return dict(_FORMATS)


def layer_class(spec: dict[str, Any], default_format: str = "groupwise_int") -> type[nn.Module]:
    """The layer class for a module spec (specs written before per-module formats were recorded
    are ``default_format``, version 1)."""
    formats = registered_formats()
    name = spec.get("format", default_format)
    version = spec.get("format_version", 1)
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


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, tuple(registered_formats().values()))


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every module of a registered format inside ``model``."""
    classes = tuple(registered_formats().values())
    for name, module in model.named_modules():
        if isinstance(module, classes):
            yield name, module


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
