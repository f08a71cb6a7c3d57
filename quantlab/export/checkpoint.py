"""quantlab checkpoints: one directory of safetensors + JSON, written atomically, never pickled.

Layout of a checkpoint directory:

* ``config.json``: the model's transformers config plus ``quantization_config``
  (``quant_method: "quantlab"``, format name and layout version, method, per-module encoding).
* ``model.safetensors``: every tensor of the model; quantized linears appear as
  ``<name>.qweight`` / ``<name>.scales`` / ``<name>.qzeros`` / ``<name>.bias`` (docs/formats.md).
* tokenizer files, ``generation_config.json`` when the model has one.
* ``quantlab_report.json``: what produced it (method, calibration, per-layer loss, timings).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quantlab.export.atomic import atomic_directory
from quantlab.formats.groupwise_int import FORMAT_NAME
from quantlab.nn.registry import (
    FormatError,
    layer_class,
    module_spec,
    quantized_modules,
    registered_formats,
)

__all__ = [
    "CheckpointError",
    "WEIGHTS_NAME",
    "groupwise_specs",
    "module_defaults",
    "instantiate_quantized",
    "load_quantized",
    "quantization_config_of",
    "read_quantization_config",
    "read_safetensors_header",
    "save_quantized",
    "state_dict_without_shared",
    "validate_checkpoint",
    "write_checkpoint",
]

WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "quantlab_report.json"
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, truncated, corrupt, or of an unknown layout."""


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
        "quant_method": "quantlab",
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "format_version": versions.pop() if len(versions) == 1 else 0,
        "method": method,
        "config": method_config,
        "modules": modules,
    }


def state_dict_without_shared(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[tuple[int, int, torch.dtype], str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue  # e.g. lm_head.weight tied to the embedding; transformers re-ties on load
        seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def write_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write ``state``, the config with ``quantization_config`` and the tokenizer, atomically.

    Shared by every checkpoint layout quantlab writes; an existing ``out_dir`` is replaced only
    once the new directory is complete.
    """
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / WEIGHTS_NAME).chmod(0o644)
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return out


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    method: str,
    method_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (with its QuantLinear modules) to ``out_dir`` in quantlab's own layout."""
    qconfig = quantization_config_of(model, method, method_config)
    state = state_dict_without_shared(model)
    return write_checkpoint(model, out_dir, state, qconfig, tokenizer, report)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {size} bytes, "
            f"header promises {8 + header_len + end}"
        )
    return header


def read_quantization_config(
    root: Path, quant_method: str, kind: str
) -> tuple[Path, dict[str, Any]]:
    """The path of ``root/config.json`` and its ``quantization_config``, which must say
    ``quant_method`` (``kind`` names such a checkpoint in the error, e.g. ``"an AWQ"``); raise
    :class:`CheckpointError` on a missing file, invalid JSON or another method."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: missing config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {exc}") from exc
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != quant_method:
        found = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        raise CheckpointError(f"{cfg_path}: not {kind} checkpoint (quant_method {found!r})")
    return cfg_path, qcfg


def validate_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint directory before loading it; return its ``quantization_config``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    cfg_path, qcfg = read_quantization_config(root, "quantlab", "a quantlab")
    modules = qcfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{cfg_path}: quantization_config lists no quantized modules")
    default_format = module_defaults(qcfg)
    if default_format:
        try:
            layer_class(default_format)
        except FormatError as exc:
            readable = ", ".join(
                f"{name} v{cls.format_version}" for name, cls in registered_formats().items()
            )
            raise CheckpointError(
                f"{cfg_path}: format {default_format['format']!r} "
                f"v{default_format['format_version']} is not readable by this quantlab "
                f"({readable})"
            ) from exc
    classes = {}
    for name, spec in modules.items():
        try:
            classes[name] = layer_class({**default_format, **spec})
        except FormatError as exc:
            raise CheckpointError(f"{cfg_path}: module {name}: {exc}") from exc
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{root}: missing {WEIGHTS_NAME}")
    header = read_safetensors_header(weights)
    for name, spec in modules.items():
        for suffix, want in classes[name].checkpoint_tensors(spec).items():
            if f"{name}.{suffix}" not in header:
                raise CheckpointError(f"{weights}: tensor {name}.{suffix} is missing")
            dtype = header[f"{name}.{suffix}"]["dtype"]
            if want is not None and dtype != want:
                raise CheckpointError(
                    f"{weights}: {name}.{suffix} has dtype {dtype}, expected {want}"
                )
    return qcfg


def load_quantized(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load a quantlab checkpoint as a transformers model with :class:`QuantLinear` layers."""
    validate_checkpoint(path)
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    register()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(device)
    model.eval()
    return model


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


def instantiate_quantized(
    root: Path,
    state: dict[str, torch.Tensor],
    specs: dict[str, dict[str, Any]],
    dtype: torch.dtype,
) -> nn.Module:
    """Build the transformers model of ``root/config.json`` with an empty quantized layer of
    ``specs[path]``'s format at each listed path, and load ``state`` into it, strictly.

    Used by loaders that read the tensors themselves: foreign layouts (GPTQ, AWQ) once they have
    converted them to quantlab's, and loaders that take only part of a checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from quantlab.nn.swap import swap_in_empty

    config = AutoConfig.from_pretrained(root)
    config.quantization_config = None
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = [swap_in_empty(model, name, spec) for name, spec in specs.items()]
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{root / WEIGHTS_NAME}: tensors do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for layer in layers:
        if hasattr(layer, "after_load"):
            layer.after_load()
    model.tie_weights()
    return model.eval()
