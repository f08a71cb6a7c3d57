"""What the readers of other tools' groupwise layouts (GPTQ, AWQ) share: finding and checking the
checkpoint's files and ``quantization_config``, and turning each quantized module's tensors into
quantlab's groupwise format."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantlab.export.checkpoint_files import INDEX_FILE, SINGLE_FILE, CheckpointFiles, has_weights
from quantlab.export.checksums import verify_checksums
from quantlab.export.errors import CheckpointError
from quantlab.export.schema import read_quantization_config
from quantlab.formats.groupwise_int import GroupwiseIntResult, pack
from quantlab.nn.layer_spec import FormatError, spec_bool, spec_int, spec_str

__all__ = [
    "ForeignCheckpoint",
    "config_field",
    "read_foreign_checkpoint",
    "state_in_groupwise_format",
]

# (tensors of one module by suffix) -> (codes [N, K], scales [N, G], zero points [N, G] or None)
ModuleConverter = Callable[
    [dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
]


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A checkpoint directory of another tool's layout whose files and config have been checked."""

    root: Path
    quantization_config: dict[str, Any]
    verify: bool = True

    def files(self) -> CheckpointFiles:
        """Its tensors (single file or shards; headers checked)."""
        return CheckpointFiles(self.root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def field(self, key: str, kind: type, *fallbacks: str, default: Any = ...) -> Any:
        """``quantization_config[key]`` (or the first of ``fallbacks`` present, the names other
        tools use), checked to be ``kind`` (int, bool or str); :class:`CheckpointError`
        naming the file and the field when it is missing without ``default`` or mistyped."""
        return config_field(
            self.quantization_config, self.config_path, key, kind, *fallbacks, default=default
        )


_READERS = {int: spec_int, bool: spec_bool, str: spec_str}


def config_field(
    qcfg: dict[str, Any], where: object, key: str, kind: type, *fallbacks: str, default: Any = ...
) -> Any:
    """A typed field of a foreign ``quantization_config`` (see :meth:`ForeignCheckpoint.field`)."""
    name = next((k for k in (key, *fallbacks) if k in qcfg), key)
    try:
        if default is ...:
            return _READERS[kind](qcfg, name)
        return _READERS[kind](qcfg, name, default)
    except FormatError as exc:
        raise CheckpointError(f"{where}: quantization_config {exc}") from exc


def read_foreign_checkpoint(
    path: str | os.PathLike[str], quant_method: str, kind: str, verify: bool = True
) -> ForeignCheckpoint:
    """Check ``path`` holds ``config.json`` (saying ``quant_method``, see
    :func:`read_quantization_config`) and its weights (``model.safetensors`` or shards); ``verify``:
    once the tensors
    are converted (whose errors are more specific), check the files against the checksums quantlab
    recorded when it wrote the checkpoint."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    _, qcfg = read_quantization_config(root, quant_method, kind)
    if not has_weights(root):
        raise CheckpointError(f"{root}: missing {SINGLE_FILE} (or {INDEX_FILE} and its shards)")
    return ForeignCheckpoint(root, qcfg, verify)


def state_in_groupwise_format(
    checkpoint: ForeignCheckpoint,
    suffixes: tuple[str, ...],
    convert: ModuleConverter,
    bits: int,
    group_size: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's state dict with every module that has a ``.qweight`` converted by
    ``convert`` from its ``suffixes`` tensors to quantlab's groupwise tensors (fp16 scales), and
    the names of those modules. A module lacking a tensor, or one ``convert`` rejects
    (``ValueError``), raises :class:`CheckpointError` naming it."""
    with checkpoint.files() as files:
        weights = files.source
        names = sorted(k[: -len(".qweight")] for k in files.tensors if k.endswith(".qweight"))
        state = {key: files.get(key) for key in files.tensors}
    for name in names:
        missing = [s for s in suffixes if f"{name}.{s}" not in state]
        if missing:
            raise CheckpointError(f"{weights}: {name} lacks {missing}")
        tensors = {s: state.pop(f"{name}.{s}") for s in suffixes}
        try:
            q, scales, zeros = convert(tensors)
            packed = pack(GroupwiseIntResult(q, scales, zeros, bits, group_size), "float16")
        except ValueError as exc:
            raise CheckpointError(f"{weights}: {name}: {exc}") from exc
        state.update({f"{name}.{k}": v for k, v in packed.tensors().items()})
    if checkpoint.verify:
        verify_checksums(checkpoint.root)
    return state, names
