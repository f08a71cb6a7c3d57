"""What the readers of other tools' groupwise layouts (GPTQ, AWQ, compressed-tensors) share:
finding and checking the checkpoint's files and ``quantization_config``, and turning each
quantized module's tensors into quantlab's groupwise format."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import INDEX_FILE, SINGLE_FILE, CheckpointFiles, has_weights
from quantlab.export.checksums import verify_checksums
from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import TensorInfo
from quantlab.export.schema import groupwise_specs, read_quantization_config
from quantlab.formats.groupwise_int import GroupwiseIntResult, pack
from quantlab.nn.layer_spec import FormatError, spec_bool, spec_int, spec_str

if TYPE_CHECKING:
    from quantlab.export.lazy_model import LazyModel

__all__ = [
    "ConvertedFiles",
    "ForeignCheckpoint",
    "GroupwiseReading",
    "config_field",
    "load_groupwise",
    "open_groupwise_lazily",
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


@dataclass(frozen=True)
class GroupwiseReading:
    """A checked foreign checkpoint and how its quantized modules become quantlab's groupwise
    layers: the tensor suffixes of one module, their converter, and the encoding (one for the
    whole model, as these layouts have)."""

    checkpoint: ForeignCheckpoint
    suffixes: tuple[str, ...]
    convert: ModuleConverter
    bits: int
    group_size: int
    sym: bool
    # The suffix that marks a quantized module's tensors (GPTQ's and AWQ's qweight,
    # compressed-tensors' weight_packed) and the dtype its layers keep their scales in.
    marker: str = "qweight"
    scale_dtype: str = "float16"

    def module_names(self, stored: Iterable[str]) -> list[str]:
        """The quantized modules among the ``stored`` tensor names (those with a ``marker``)."""
        end = f".{self.marker}"
        return sorted(k[: -len(end)] for k in stored if k.endswith(end))

    def check_complete(
        self, name: str, stored: Iterable[str] | Mapping[str, Any], where: object
    ) -> None:
        """:class:`CheckpointError` naming ``where`` when module ``name`` lacks a suffix tensor."""
        missing = [s for s in self.suffixes if f"{name}.{s}" not in stored]
        if missing:
            raise CheckpointError(f"{where}: {name} lacks {missing}")

    def specs(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return groupwise_specs(names, self.bits, self.group_size, self.sym, self.scale_dtype)

    def converted(
        self, name: str, tensors: dict[str, torch.Tensor], where: object
    ) -> dict[str, torch.Tensor]:
        """Module ``name``'s groupwise tensors (scales in ``scale_dtype``) from its ``suffixes``
        tensors; a tensor the converter rejects is a :class:`CheckpointError` naming ``where``
        and it."""
        try:
            q, scales, zeros = self.convert(tensors)
            result = GroupwiseIntResult(q, scales, zeros, self.bits, self.group_size)
            return pack(result, self.scale_dtype).tensors()
        except ValueError as exc:
            raise CheckpointError(f"{where}: {name}: {exc}") from exc


def state_in_groupwise_format(
    reading: GroupwiseReading,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's state dict with every quantized module converted to quantlab's groupwise
    tensors, and the names of those modules. A module lacking a tensor, or one the converter
    rejects, raises :class:`CheckpointError` naming it."""
    with reading.checkpoint.files() as files:
        weights = files.source
        names = reading.module_names(files.tensors)
        state = {key: files.get(key) for key in files.tensors}
    for name in names:
        reading.check_complete(name, state, weights)
        tensors = {s: state.pop(f"{name}.{s}") for s in reading.suffixes}
        converted = reading.converted(name, tensors, weights)
        state.update({f"{name}.{k}": v for k, v in converted.items()})
    if reading.checkpoint.verify:
        verify_checksums(reading.checkpoint.root)
    return state, names


def load_groupwise(
    reading: GroupwiseReading, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """The whole model of ``reading``'s checkpoint with quantlab's groupwise layers."""
    from quantlab.export.model_fill import instantiate_quantized

    state, names = state_in_groupwise_format(reading)
    model = instantiate_quantized(reading.checkpoint.root, state, reading.specs(names), dtype)
    return model.to(device)


class ConvertedFiles:
    """A foreign groupwise checkpoint's tensors under quantlab's names, read the way
    :class:`~quantlab.export.lazy_model.LazyModel` reads a checkpoint: each quantized module is
    converted when one of its tensors is first asked for (the module's other tensors are then
    served from that conversion), every other tensor is read as stored. So a GPTQ or AWQ
    checkpoint larger than memory is evaluated block by block like quantlab's own.

    ``files`` are the checkpoint's (headers read once by the caller); ``expected`` maps each
    converted tensor's name to a tensor of its shape and dtype (the empty
    layers of the model it fills): ``tensors`` lists those for the model's checks, and a
    conversion that produces anything else is a :class:`CheckpointError`."""

    def __init__(
        self,
        reading: GroupwiseReading,
        files: CheckpointFiles,
        expected: Mapping[str, torch.Tensor],
    ) -> None:
        self.reading = reading
        self.files = files
        self.path = files.path
        self.source = files.source
        self.modules = reading.module_names(files.tensors)
        for name in self.modules:
            reading.check_complete(name, files.tensors, self.source)
        converted_away = {f"{m}.{s}" for m in self.modules for s in reading.suffixes}
        self.tensors: dict[str, TensorInfo] = {
            k: v for k, v in self.files.tensors.items() if k not in converted_away
        }
        self.tensors.update({k: TensorInfo.of(v) for k, v in expected.items()})
        self._module_of = {k: k.rsplit(".", 1)[0] for k in expected}
        self._converted: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU (converted, for a quantized module's)."""
        module = self._module_of.get(name)
        if module is None:
            return self.files.get(name)
        if name not in self._converted:
            stored = {s: self.files.get(f"{module}.{s}") for s in self.reading.suffixes}
            converted = self.reading.converted(module, stored, self.source)
            self._converted = {f"{module}.{k}": v for k, v in converted.items()}
            for key, value in self._converted.items():
                want = self.tensors.get(key)
                if want is None or TensorInfo.of(value) != want:
                    have = TensorInfo.of(value).describe()
                    raise CheckpointError(
                        f"{self.source}: {module}: converts to {key.rsplit('.', 1)[1]} {have}, "
                        f"the model its config.json describes expects "
                        f"{'none' if want is None else want.describe()}"
                    )
        # Served once: a module's tensors are loaded together, then released with its block.
        return self._converted.pop(name)

    def close(self) -> None:
        self.files.close()


def open_groupwise_lazily(
    reading: GroupwiseReading,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LazyModel:
    """The checkpoint of ``reading`` as a :class:`LazyModel` with quantlab's groupwise layers on
    the meta device, each block converted and checked (floats finite, each layer's own checks)
    only when it is loaded; with ``verify``, the files are checked against quantlab's checksums
    first."""
    from transformers import AutoConfig

    from quantlab.export.lazy_model import LazyModel, empty_model
    from quantlab.export.model_fill import checked_after_load
    from quantlab.nn.swap import swap_in_empty

    root = reading.checkpoint.root
    if reading.checkpoint.verify:
        verify_checksums(root)
    config = AutoConfig.from_pretrained(root)
    config.quantization_config = None
    del config.quantization_config  # the layers are swapped in here, not by transformers
    model = empty_model(config, dtype)
    files = reading.checkpoint.files()
    names = reading.module_names(files.tensors)
    stored = files.tensors
    expected: dict[str, torch.Tensor] = {}
    for name, spec in reading.specs(names).items():
        try:
            layer = swap_in_empty(model, name, spec)
        except ValueError as exc:
            raise CheckpointError(f"{root}: {exc}") from exc
        for key, tensor in layer.state_dict().items():
            full = f"{name}.{key}"
            if full not in stored or key in reading.suffixes:
                expected[full] = tensor
    weights = ConvertedFiles(reading, files, expected)
    return LazyModel(model, weights, device, after_load=checked_after_load(weights.source))
