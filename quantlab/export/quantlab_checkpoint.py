"""quantlab's own checkpoint layout: one directory of safetensors + JSON, written atomically,
never pickled.

Layout of a checkpoint directory:

* ``config.json``: the model's transformers config plus ``quantization_config``
  (``quant_method: "quantlab"``, format name and layout version, method, per-module encoding).
* ``model.safetensors``, or shards ``model-0000i-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` beyond ``--max-shard-size``
  (:mod:`quantlab.export.checkpoint_files`): every tensor of the model; quantized linears appear
  as ``<name>.qweight`` / ``<name>.scales`` / ``<name>.qzeros`` / ``<name>.bias``
  (docs/formats.md).
* tokenizer files, ``generation_config.json`` when the model has one.
* ``quantlab_report.json``: what produced it (method, calibration, per-layer loss, timings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.atomic import atomic_directory, output_lock
from quantlab.export.checkpoint_files import DEFAULT_MAX_SHARD_BYTES, CheckpointFiles, ShardedWriter
from quantlab.export.checksums import verify_checksums, write_checksums
from quantlab.export.layout import CheckpointLayout, QuantlabLayout, layout_state
from quantlab.export.lazy_model import LazyModel, empty_model
from quantlab.export.model_fill import (
    build_model,
    checked_after_load,
    fill_model,
)
from quantlab.export.output_guard import check_output_target
from quantlab.export.safetensors_file import TensorInfo
from quantlab.export.schema import (
    QUANT_METHOD,
    REPORT_NAME,
    module_specs,
    read_quantization_config,
)
from quantlab.export.state_check import check_state_matches_model
from quantlab.nn.swap import swap_in_empty

__all__ = [
    "CheckedCheckpoint",
    "check_checkpoint",
    "load_quantized",
    "open_lazily",
    "save_quantized",
    "validate_checkpoint",
    "write_checkpoint",
    "write_in_layout",
]


def write_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``state`` (in shards of at most ``max_shard_bytes``), the config with
    ``quantization_config``, the tokenizer and the checksum manifest
    (:mod:`quantlab.export.checksums`, written last), atomically.

    Shared by every checkpoint layout quantlab writes; an existing ``out_dir`` is replaced only
    once the new directory is complete (:func:`quantlab.export.atomic.atomic_directory`), and only
    if quantlab wrote it: a file or a foreign non-empty directory there is refused
    (:func:`quantlab.export.output_guard.check_output_target`).
    """
    out = Path(out_dir)
    # Under the lock, so nothing changes ``out`` between the check and the swap; the CLI checks
    # with its --overwrite flag earlier (holding the same, re-entrant lock).
    with output_lock(out):
        check_output_target(out, overwrite=True)
        with atomic_directory(out) as tmp:
            with ShardedWriter(tmp, max_shard_bytes) as writer:
                writer.add_all(state)
                writer.close()
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
            write_checksums(tmp)
    return out


def write_in_layout(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    layout: CheckpointLayout,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` in ``layout`` (each quantized layer converted by it, its
    ``quantization_config`` in config.json) with :func:`write_checkpoint`."""
    state = layout_state(model, layout)
    qconfig = layout.quantization_config(model)
    return write_checkpoint(model, out_dir, state, qconfig, tokenizer, report, max_shard_bytes)


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    method: str,
    method_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (with its quantized layers) to ``out_dir`` in quantlab's own layout."""
    layout = QuantlabLayout(method, method_config)
    return write_in_layout(model, out_dir, layout, tokenizer, report, max_shard_bytes)


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A quantlab checkpoint whose config, module specs, tensors and checksums were checked."""

    root: Path
    quantization_config: dict[str, Any]
    specs: dict[str, dict[str, Any]]
    files: CheckpointFiles
    # The checksum manifest the files were verified against (None: not verified, or none).
    manifest: dict[str, Any] | None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.files.tensors

    @property
    def weights(self) -> Path:
        """The file errors about the tensors name: the single file, or the shard index."""
        return self.files.source


def check_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> CheckedCheckpoint:
    """Check a quantlab checkpoint completely without reading a tensor value: config.json and
    every module spec (typed, no unknown fields), the safetensors header, the tensors against
    the model the config describes (:mod:`quantlab.export.state_check`), and with ``verify``
    the files against the checksums recorded at export (:mod:`quantlab.export.checksums`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    cfg_path, qcfg = read_quantization_config(root, QUANT_METHOD, "a quantlab")
    specs = module_specs(qcfg, cfg_path)
    files = CheckpointFiles(root)
    skeleton = build_model(root, specs, torch.float32, meta=True)
    check_state_matches_model(skeleton, files.tensors, files.source)
    manifest = verify_checksums(root) if verify else None
    return CheckedCheckpoint(root, qcfg, specs, files, manifest)


def validate_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Check a checkpoint directory before loading it (:func:`check_checkpoint`); return its
    ``quantization_config``."""
    return check_checkpoint(path, verify).quantization_config


def load_quantized(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> nn.Module:
    """Load a quantlab checkpoint as a transformers model with its quantized layers, strictly:
    everything :func:`check_checkpoint` checks, then every value as it is copied in (floats
    finite, tied copies equal, each layer's own checks such as positive scales)."""
    checked = check_checkpoint(path, verify)
    with checked.files as files:
        model = fill_model(
            checked.root, files.tensors, files.get, checked.specs, dtype, files.source
        )
    return model.to(device)


def open_lazily(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> LazyModel:
    """A quantlab checkpoint as a :class:`LazyModel`: checked as :func:`load_quantized` checks it
    (without reading a value), its quantized layers swapped in on the meta device, and each part
    read only when it is loaded, with the same value checks as it comes in (floats finite, each
    layer's own checks). For evaluating a checkpoint larger than memory block by block."""
    from transformers import AutoConfig

    checked = check_checkpoint(path, verify)
    model = empty_model(AutoConfig.from_pretrained(checked.root), dtype)
    for name, spec in checked.specs.items():
        swap_in_empty(model, name, spec)
    return LazyModel(model, checked.files, device, after_load=checked_after_load(checked.weights))
