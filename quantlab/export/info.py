"""What a checkpoint directory is, without loading it: ``quantlab info DIR``.

Layout and version, the method and its settings, bits per weight, a summary of the quantized
modules by encoding, sizes on disk and in memory, a content hash of the tensors (their names,
dtypes, shapes and bytes, in name order, so the same weights hash the same whether sharded or
not) and the engines that load the layout (docs/formats.md). For BitStack checkpoints, the
memory budgets its block order supports. Values are read only for the hash (``content_hash``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from quantlab.export.bitnet_checkpoint import bitnet_modules
from quantlab.export.bitstack_checkpoint import is_bitstack_checkpoint, plan_from_checkpoint
from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.fp8_source import FP8_QUANT_METHOD, Fp8BlockFiles, fp8_block_size
from quantlab.export.lazy_model import empty_model
from quantlab.export.load import checkpoint_kind, open_checkpoint_lazily
from quantlab.export.schema import read_config_json
from quantlab.formats.compressed_tensors_layout import CT_QUANT_METHOD
from quantlab.nn.registry import module_spec, quantized_modules, quantized_storage

__all__ = ["ENGINES", "checkpoint_info", "content_hash"]

# Who loads each layout (docs/formats.md's table says how each was checked).
ENGINES: dict[str, list[str]] = {
    "float": ["transformers", "vLLM", "quantlab"],
    "quantlab": ["quantlab", "transformers (after quantlab.integrations.transformers.register())"],
    "bitstack": ["quantlab"],
    "gptq": ["transformers (GPTQModel/optimum)", "vLLM", "GPTQModel", "quantlab"],
    "awq": ["transformers (GPTQModel kernels)", "vLLM", "quantlab"],
    CT_QUANT_METHOD: ["vLLM", "transformers", "llm-compressor", "quantlab"],
    "bitnet": ["transformers", "quantlab"],
    FP8_QUANT_METHOD: ["vLLM", "transformers (GPU)", "quantlab (dequantized to bf16)"],
}


def content_hash(files: CheckpointFiles) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(files.tensors):
        tensor = files.get(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    files.close()
    return digest.hexdigest()


def _encoding(spec: dict[str, Any]) -> str:
    fmt = spec.get("format", "?")
    rest = {k: v for k, v in spec.items() if k not in ("format", "format_version")}
    fields = ", ".join(f"{k} {v}" for k, v in sorted(rest.items()) if not isinstance(v, dict))
    return f"{fmt} v{spec.get('format_version', 1)}: {fields}" if fields else fmt


def _memory_bytes(model: torch.nn.Module, float_bytes: int) -> int:
    """Bytes of ``model`` once loaded (a meta-device skeleton will do): quantized layers' tensors
    as stored, every other float tensor at ``float_bytes`` each."""
    packed = {id(t) for _, m in quantized_modules(model) for t in [*m.parameters(), *m.buffers()]}
    total = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = float_bytes if tensor.is_floating_point() and id(tensor) not in packed else None
        total += tensor.numel() * (size or tensor.element_size())
    return total


def _bitnet_summary(root: Path, qcfg: dict[str, Any], files: CheckpointFiles) -> dict[str, Any]:
    """A BitNet b1.58 checkpoint's ternary linears (as :func:`load_bitnet` finds them) and the
    bits quantlab stores them in once loaded (2-bit codes, one fp32 scale per tensor)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root)
    config.quantization_config = None
    model = empty_model(config)
    dtypes = {name: t.dtype for name, t in files.tensors.items()}
    names = bitnet_modules(model, qcfg, dtypes)
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    mode = qcfg.get("quantization_mode", "offline")
    linear = qcfg.get("linear_class", "bitlinear")
    return {
        "modules": {f"ternary (BitNet b1.58, {mode}, {linear})": len(names)},
        "quantized_linears": len(names),
        "bits_per_weight": (2 * weights + 32 * len(names)) / weights if weights else None,
    }


def checkpoint_info(path: str | os.PathLike[str], with_hash: bool = True) -> dict[str, Any]:
    """The description ``quantlab info`` prints (module docstring); ``with_hash`` reads every
    tensor once for the content hash."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    _, config = read_config_json(root)
    kind = checkpoint_kind(root)
    bitstack = is_bitstack_checkpoint(root)
    layout = "bitstack" if bitstack else (kind or "float")
    qcfg = config.get("quantization_config") or {}
    files = CheckpointFiles(root)
    float_dtype = (
        files.dtype()
        if any(i.dtype.is_floating_point for i in files.tensors.values())
        else torch.float32
    )
    float_bytes = torch.empty((), dtype=float_dtype).element_size()
    info: dict[str, Any] = {
        "path": str(root),
        "layout": layout,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "dtype": config.get("dtype", config.get("torch_dtype")),
        "method": (
            qcfg.get("method")
            or (qcfg.get("quantlab") or {}).get("method")
            or (qcfg.get("meta") or {}).get("quantlab_method")
        ),
        "method_config": qcfg.get("config"),
        "format": qcfg.get("format"),
        "format_version": qcfg.get("format_version", qcfg.get("version")),
        "tensors": len(files.tensors),
        "files": files.file_names(),
        "disk_bytes": sum(f.stat().st_size for f in root.iterdir() if f.is_file()),
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "memory_bytes": files.resident_bytes(float_dtype),
        "engines": ENGINES.get(layout, ["quantlab"] if layout == "quantlab" else []),
    }
    lazy = None if bitstack else open_checkpoint_lazily(root, verify=False)
    if lazy is not None:
        encodings = Counter(_encoding(module_spec(m)) for _, m in quantized_modules(lazy.model))
        bits, weights = quantized_storage(lazy.model)
        info["modules"] = dict(sorted(encodings.items()))
        info["quantized_linears"] = sum(encodings.values())
        info["bits_per_weight"] = bits / weights if weights else None
        info["memory_bytes"] = _memory_bytes(lazy.model, float_bytes)
        lazy.weights.close()
    if layout == "bitnet":
        info.update(_bitnet_summary(root, qcfg, files))
    if layout == FP8_QUANT_METHOD:
        block = fp8_block_size(config, root)
        assert block is not None
        source = Fp8BlockFiles(files, block)
        bn, bk = block
        info["modules"] = {f"fp8 (block scales {bn} x {bk}; read as bf16)": len(source.scaled)}
        info["quantized_linears"] = len(source.scaled)
        info["bits_per_weight"] = 8 + 32 / (bn * bk)
    if bitstack:
        plan = plan_from_checkpoint(root, float_dtype, verify=False)
        info["modules"] = {"bitstack": len(plan.modules)}
        info["quantized_linears"] = len(plan.modules)
        steps = len(plan.order)
        marks = sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps})
        info["budget_curve"] = [
            {"blocks_added": s, "memory_bytes": plan.config_bytes(s)} for s in marks
        ]
        info["memory_bytes"] = plan.total_bytes
    if with_hash:
        info["content_hash"] = "sha256:" + content_hash(files)
    files.close()
    return info
