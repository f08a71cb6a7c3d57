"""The checkpoint schema: what config.json's ``quantization_config`` says, read and written.

quantlab's own layout stores ``quant_method: "quantlab"``, a top-level ``format`` (the one layer
format of all modules, or ``"mixed"``) with its ``format_version``, the ``method`` and its
``config``, and ``modules``: every quantized module's spec (its format, version and encoding,
read by the layer class of that format, :mod:`quantlab.nn.registry`). The GPTQ, AWQ and BitNet
readers use :func:`read_quantization_config` for their own ``quant_method``.

This is the level every other checkpoint module and the transformers integration import; it
imports no loader and no writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from quantlab.export.errors import CheckpointError
from quantlab.formats.groupwise_int import FORMAT_NAME
from quantlab.nn.layer_spec import FormatError
from quantlab.nn.registry import (
    check_spec,
    layer_class,
    module_spec,
    quantized_modules,
    registered_formats,
)

__all__ = [
    "QUANT_METHOD",
    "REPORT_NAME",
    "CheckpointError",
    "groupwise_specs",
    "module_defaults",
    "module_specs",
    "quantization_config_of",
    "read_config_json",
    "read_quantization_config",
]

# The quant_method of quantlab's own layout in config.json's quantization_config.
QUANT_METHOD = "quantlab"
REPORT_NAME = "quantlab_report.json"


def module_defaults(qcfg: dict[str, Any]) -> dict[str, Any]:
    """Format fields a module spec inherits from the top level (checkpoints written before
    modules recorded their own format hold only ``groupwise_int`` modules)."""
    name = qcfg.get("format", FORMAT_NAME)
    if name == "mixed":
        return {}
    return {"format": name, "format_version": qcfg.get("format_version", 1)}


def quantization_config_of(
    model: nn.Module, method: str, method_config: dict[str, Any]
) -> dict[str, Any]:
    """The ``quantization_config`` dict describing every quantized module in ``model``.

    Each entry of ``modules`` carries its layer format and version; the top-level ``format`` is
    that format when all modules share it (``"mixed"`` otherwise).
    """
    modules = {name: module_spec(m) for name, m in quantized_modules(model)}
    if not modules:
        raise ValueError("the model has no quantized modules; quantize it before saving")
    formats = {spec["format"] for spec in modules.values()}
    versions = {spec["format_version"] for spec in modules.values()}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "format_version": versions.pop() if len(versions) == 1 else 0,
        "method": method,
        "config": method_config,
        "modules": modules,
    }


def read_config_json(root: Path) -> tuple[Path, dict[str, Any]]:
    """``(path, parsed JSON object)`` of ``root/config.json``; :class:`CheckpointError` naming
    the file when it is missing, not JSON, or not a JSON object."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: missing config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return cfg_path, config


def read_quantization_config(
    root: Path, quant_method: str, kind: str
) -> tuple[Path, dict[str, Any]]:
    """The path of ``root/config.json`` and its ``quantization_config``, which must say
    ``quant_method`` (``kind`` names such a checkpoint in the error, e.g. ``"an AWQ"``); raise
    :class:`CheckpointError` on a missing file, invalid JSON or another method."""
    cfg_path, config = read_config_json(root)
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != quant_method:
        found = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        raise CheckpointError(f"{cfg_path}: not {kind} checkpoint (quant_method {found!r})")
    return cfg_path, qcfg


def module_specs(qcfg: dict[str, Any], where: object) -> dict[str, dict[str, Any]]:
    """Every quantized module's spec of a quantlab ``quantization_config`` (top-level format
    defaults merged in), each checked completely (:func:`quantlab.nn.registry.check_spec`);
    ``where`` (the config's path) is named in the :class:`CheckpointError`."""
    modules = qcfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(
            f"{where}: quantization_config.modules must be a non-empty JSON object "
            f"{{module path: spec}}, got {type(modules).__name__}"
        )
    fmt, version = qcfg.get("format", FORMAT_NAME), qcfg.get("format_version", 1)
    if fmt != "mixed":
        try:
            layer_class({"format": fmt, "format_version": version})
        except FormatError as exc:
            readable = ", ".join(
                f"{name} v{cls.format_version}" for name, cls in registered_formats().items()
            )
            raise CheckpointError(
                f"{where}: format {fmt!r} v{version} is not readable by this quantlab ({readable})"
            ) from exc
    defaults = module_defaults(qcfg)
    specs = {}
    for name, spec in modules.items():
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: module {name}: spec must be a JSON object")
        merged = {**defaults, **spec}
        try:
            check_spec(merged)
        except FormatError as exc:
            raise CheckpointError(f"{where}: module {name}: {exc}") from exc
        specs[name] = merged
    return specs


def groupwise_specs(
    names: list[str], bits: int, group_size: int, sym: bool, scale_dtype: str = "float16"
) -> dict[str, dict[str, Any]]:
    """Module specs of ``groupwise_int`` layers, one encoding for all ``names``."""
    spec = {
        "format": FORMAT_NAME,
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "scale_dtype": scale_dtype,
    }
    return {name: dict(spec) for name in names}
