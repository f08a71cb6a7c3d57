"""A checkpoint (in any layout quantlab writes) written while its model is quantized block by
block from the source checkpoint, so neither the model nor the result is ever whole in memory.

:class:`StreamingCheckpoint` opens the output the way every quantlab writer does (the lock, the
target check, a temporary directory swapped in atomically at the end: docs/reliability.md) and a
:class:`~quantlab.export.checkpoint_files.ShardedWriter` in it. Its :meth:`write_block` is the
pipeline's block sink: a quantized block's layers are checked and converted by the
:class:`~quantlab.export.layout.CheckpointLayout` (quantlab's, GPTQ's, AWQ's) and written the
moment the block is done, before the block leaves memory. :meth:`finish` then copies the tensors
the method did not touch (embedding, final norm, head) from the source checkpoint byte for byte,
in their stored dtype, and writes config.json with the layout's ``quantization_config`` (of the
model's meta-device skeleton), the tokenizer, the report and the checksum manifest. Every float
tensor a block holds outside its quantized layers (norms) is written in the dtype the source
stored it in, so a bf16 model's untouched tensors stay bf16 whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.atomic import atomic_directory, output_lock
from quantlab.export.checkpoint_files import DEFAULT_MAX_SHARD_BYTES, CheckpointFiles, ShardedWriter
from quantlab.export.checksums import write_checksums
from quantlab.export.layout import CheckpointLayout
from quantlab.export.output_guard import check_output_target
from quantlab.export.schema import REPORT_NAME
from quantlab.nn.registry import quantized_modules

__all__ = ["StreamingCheckpoint"]


class StreamingCheckpoint:
    """quantlab's layout, written block by block (see the module docstring). Use as a context
    manager around the quantization: leaving it without :meth:`finish` (an error) discards the
    partial output and keeps whatever ``out_dir`` held before."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        source: CheckpointFiles,
        blocks_path: str,
        layout: CheckpointLayout,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        inputs: tuple[Path, ...] = (),
    ) -> None:
        self.out = Path(out_dir)
        self.source = source
        self.layout = layout
        self.blocks_prefix = blocks_path + "."
        self.max_shard_bytes = max_shard_bytes
        self.inputs = inputs
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._writer: ShardedWriter | None = None
        self._quantization_config: dict[str, Any] | None = None
        self.bytes_written = 0

    def __enter__(self) -> StreamingCheckpoint:
        stack = self._stack.__enter__()
        try:
            stack.enter_context(output_lock(self.out))
            check_output_target(self.out, inputs=self.inputs, overwrite=True)
            self._tmp = stack.enter_context(atomic_directory(self.out))
            self._writer = stack.enter_context(ShardedWriter(self._tmp, self.max_shard_bytes))
        except BaseException:
            self._stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None, "use StreamingCheckpoint as a context manager"
        self._writer.add(name, tensor)
        self.bytes_written += tensor.numel() * tensor.element_size()

    def _stored_dtype(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the dtype the source stored ``name`` in (float tensors the source has)."""
        info = self.source.tensors.get(name)
        if info is None or not tensor.is_floating_point() or not info.dtype.is_floating_point:
            return tensor
        return tensor.to(info.dtype)

    def write_block(self, index: int, block: nn.Module) -> None:
        """The pipeline's block sink: write all of block ``index``'s tensors (quantized layers as
        the layout stores them, after its checks; the rest in the source's dtype)."""
        prefix = f"{self.blocks_prefix}{index}."
        quantized = dict(quantized_modules(block))
        for name, module in quantized.items():
            for key, tensor in self.layout.layer_tensors(prefix + name, module).items():
                self._add(key, tensor)
        packed_prefixes = tuple(f"{name}." for name in quantized)
        for key, tensor in block.state_dict().items():
            if not key.startswith(packed_prefixes):
                self._add(prefix + key, self._stored_dtype(prefix + key, tensor))

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        """The layout's ``quantization_config`` of ``model`` once every block was added; computed
        once (the report names the layout from it before :meth:`finish` writes it)."""
        if self._quantization_config is None:
            self._quantization_config = self.layout.quantization_config(model)
        return self._quantization_config

    def describe(self, model: nn.Module) -> str:
        """The layout written, for the summary (after its checks of ``model``)."""
        self.quantization_config(model)
        return self.layout.describe()

    def finish(
        self, model: nn.Module, tokenizer: Any = None, report: dict[str, Any] | None = None
    ) -> Path:
        """Copy the untouched tensors, write the JSON files and put the checkpoint in place."""
        assert self._tmp is not None and self._writer is not None
        tmp = self._tmp
        for name in self.source.tensors:
            if not name.startswith(self.blocks_prefix):
                self._add(name, self.source.get(name))
        self._writer.close()
        config = model.config.to_dict()
        config["quantization_config"] = self.quantization_config(model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = self.source.path / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / generation.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        write_checksums(tmp)
        self.__exit__(None, None, None)
        return self.out
