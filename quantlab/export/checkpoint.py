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
from quantlab.formats.groupwise_int import FORMAT_NAME, FORMAT_VERSION
from quantlab.nn.linear import QuantLinear

__all__ = [
    "CheckpointError",
    "WEIGHTS_NAME",
    "instantiate_quantized",
    "load_quantized",
    "quantization_config_of",
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


def quantization_config_of(
    model: nn.Module, method: str, method_config: dict[str, Any]
) -> dict[str, Any]:
    """The ``quantization_config`` dict describing every :class:`QuantLinear` in ``model``."""
    modules = {
        name: {
            "bits": m.meta.bits,
            "group_size": m.meta.group_size,
            "sym": m.meta.sym,
            "scale_dtype": m.meta.scale_dtype,
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    if not modules:
        raise ValueError("the model has no QuantLinear modules; quantize it before saving")
    return {
        "quant_method": "quantlab",
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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


def validate_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint directory before loading it; return its ``quantization_config``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: missing config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {exc}") from exc
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "quantlab":
        raise CheckpointError(
            f"{cfg_path}: no quantlab quantization_config (quant_method 'quantlab')"
        )
    if qcfg.get("format") != FORMAT_NAME or qcfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format {qcfg.get('format')!r} v{qcfg.get('format_version')} is not "
            f"readable by this quantlab ({FORMAT_NAME} v{FORMAT_VERSION})"
        )
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{root}: missing {WEIGHTS_NAME}")
    header = read_safetensors_header(weights)
    for name, spec in qcfg.get("modules", {}).items():
        needed = ["qweight", "scales"] + ([] if spec.get("sym") else ["qzeros"])
        for suffix in needed:
            if f"{name}.{suffix}" not in header:
                raise CheckpointError(f"{weights}: tensor {name}.{suffix} is missing")
            dtype = header[f"{name}.{suffix}"]["dtype"]
            if suffix != "scales" and dtype != "I32":
                raise CheckpointError(f"{weights}: {name}.{suffix} has dtype {dtype}, expected I32")
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


def instantiate_quantized(
    root: Path,
    state: dict[str, torch.Tensor],
    quantized: list[str],
    bits: int,
    group_size: int,
    sym: bool,
    dtype: torch.dtype,
) -> nn.Module:
    """Build the transformers model of ``root/config.json`` with :class:`QuantLinear` at the
    ``quantized`` paths and load ``state`` (quantlab tensors) into it, strictly.

    Used by the loaders of foreign layouts (GPTQ, AWQ) once they have converted the tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from quantlab.nn.swap import swap_in_quant_linear

    config = AutoConfig.from_pretrained(root)
    config.quantization_config = None
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in quantized:
        swap_in_quant_linear(model, name, bits, group_size, sym)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{root / WEIGHTS_NAME}: tensors do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    return model.eval()
