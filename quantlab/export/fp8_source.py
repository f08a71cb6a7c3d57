"""Source checkpoints published in FP8 with block scales, read as the bf16 model they encode.

DeepSeek-V3/R1, Kimi-K2, the Qwen3 "-FP8" releases and others ship their linear weights as
``float8_e4m3fn`` with one fp32 scale per block of ``weight_block_size`` (``[128, 128]``):
config.json's ``quantization_config`` is ``{"quant_method": "fp8", "weight_block_size": [bn, bk],
...}`` and each such linear stores ``<linear>.weight`` (FP8, ``[N, K]``) beside
``<linear>.weight_scale_inv`` (fp32, ``[ceil(N / bn), ceil(K / bk)]``); the weight is
``fp8 * scale_inv`` blockwise (DeepSeek's ``weight_dequant``, transformers' FP8 integration).
Read as stored, the FP8 codes would be taken for the weights themselves, off by the scales, with
no error: :class:`Fp8BlockFiles` presents such a checkpoint as the float checkpoint it encodes (each
FP8 weight dequantized to bf16 as it is read, the scales hidden), so the streamed pipeline, the
evaluation and the memory plans see an ordinary bf16 model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import TensorInfo

__all__ = [
    "FP8_DTYPES",
    "FP8_QUANT_METHOD",
    "SCALE_SUFFIX",
    "Fp8BlockFiles",
    "fp8_block_size",
    "is_float_source",
    "open_source_checkpoint",
    "source_reading_notes",
]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# config.json's quant_method of such a release: a source to quantize, not a quantized checkpoint.
FP8_QUANT_METHOD = "fp8"
SCALE_SUFFIX = ".weight_scale_inv"
# What the dequantized weights are presented as (the dtype the FP8 releases compute in).
DEQUANTIZED_DTYPE = torch.bfloat16


def fp8_block_size(config: dict[str, Any], source: object) -> tuple[int, int] | None:
    """``(bn, bk)`` of a config.json whose ``quantization_config`` is block-scaled FP8, ``None``
    when it declares no FP8; another FP8 scheme is a :class:`CheckpointError` naming it."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != FP8_QUANT_METHOD:
        return None
    block = qc.get("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{source}: an FP8 checkpoint with weight_block_size {block!r}; quantlab reads the "
            "block-scaled FP8 of DeepSeek-V3 and the Qwen3 FP8 releases (weight_block_size "
            "[rows, columns]), not per-tensor or per-channel FP8"
        )
    return block[0], block[1]


def is_float_source(kind: str | None) -> bool:
    """Whether a checkpoint of quant_method ``kind`` (``None``: no quantization_config) is read
    as a float model: plain, or an FP8 release dequantized on read."""
    return kind is None or kind == FP8_QUANT_METHOD


class Fp8BlockFiles:
    """A :class:`CheckpointFiles` of a block-scaled FP8 checkpoint, seen as the float checkpoint
    it encodes: ``tensors`` lists each FP8 weight as a bf16 one and no ``weight_scale_inv``;
    ``get``/``get_rows``/``get_leading`` return the dequantized bf16 values (only the rows asked
    for, with their blocks' scales). Every other tensor reads as stored. Each FP8 weight's scale
    tensor is checked (present, fp32, ``[ceil(N / bn), ceil(K / bk)]``) when this is made."""

    def __init__(self, files: CheckpointFiles, block: tuple[int, int]) -> None:
        self.files = files
        self.block = block
        self.path = files.path
        self.source = files.source
        self.tensors: dict[str, TensorInfo] = {}
        self.scaled: dict[str, str] = {}  # weight name -> its scale's name
        bn, bk = block
        for name, info in files.tensors.items():
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix("_scale_inv")
                if weight not in files.tensors:
                    raise CheckpointError(f"{files.path}: {name} scales no weight ({weight})")
                continue
            if info.dtype not in FP8_DTYPES:
                self.tensors[name] = info
                continue
            scale = name.removesuffix(".weight") + SCALE_SUFFIX
            if not name.endswith(".weight") or len(info.shape) != 2 or scale not in files.tensors:
                raise CheckpointError(
                    f"{files.path}: {name} is stored in {info.dtype} without a {SCALE_SUFFIX} "
                    "beside it; quantlab reads FP8 weights only with their block scales"
                )
            n, k = info.shape
            want = (math.ceil(n / bn), math.ceil(k / bk))
            s_info = files.tensors[scale]
            if s_info.dtype != torch.float32 or tuple(s_info.shape) != want:
                raise CheckpointError(
                    f"{files.path}: {scale} is {s_info.dtype} {list(s_info.shape)}; the "
                    f"{list(info.shape)} weight in blocks of {list(block)} needs float32 "
                    f"{list(want)}"
                )
            self.tensors[name] = TensorInfo(shape=tuple(info.shape), dtype=DEQUANTIZED_DTYPE)
            self.scaled[name] = scale

    # -- the CheckpointFiles interface ---------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def file_of(self, name: str) -> Path:
        return self.files.file_of(name)

    def file_names(self) -> list[str]:
        return self.files.file_names()

    def dtype(self) -> torch.dtype:
        return DEQUANTIZED_DTYPE

    def nbytes(self, prefix: str = "") -> int:
        return sum(info.nbytes() for name, info in self.tensors.items() if name.startswith(prefix))

    def resident_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(
            math.prod(info.shape) * size if info.dtype.is_floating_point else info.nbytes()
            for info in self.tensors.values()
        )

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """FP8 rows ``codes`` times their blocks' scales (``scales``: one row of block scales per
        row of ``codes``), in fp32, rounded once to bf16."""
        per_column = scales.repeat_interleave(self.block[1], dim=1)[:, : codes.shape[1]]
        return (codes.to(torch.float32) * per_column).to(DEQUANTIZED_DTYPE)

    def get(self, name: str) -> torch.Tensor:
        scale = self.scaled.get(name)
        if scale is None:
            return self.files.get(name)
        codes = self.files.get(name)
        scales = self.files.get(scale).repeat_interleave(self.block[0], dim=0)[: codes.shape[0]]
        return self._dequantize(codes, scales)

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        scale = self.scaled.get(name)
        if scale is None:
            return self.files.get_rows(name, rows)
        rows = list(rows)
        block_rows = torch.tensor([r // self.block[0] for r in rows], dtype=torch.long)
        return self._dequantize(self.files.get_rows(name, rows), self.files.get(scale)[block_rows])

    def get_leading(self, name: str, stop: int) -> torch.Tensor:
        if name not in self.scaled:
            return self.files.get_leading(name, stop)
        return self.get_rows(name, range(stop))

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> Fp8BlockFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source_checkpoint(path: str | os.PathLike[str]) -> CheckpointFiles | Fp8BlockFiles:
    """The float checkpoint at ``path`` as the pipeline reads it: its files as stored, or, for a
    block-scaled FP8 release, :class:`Fp8BlockFiles` over them."""
    files = CheckpointFiles(path)
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from exc
    block = fp8_block_size(config, config_path)
    if block is None:
        if any(info.dtype in FP8_DTYPES for info in files.tensors.values()):
            raise CheckpointError(
                f"{path}: holds FP8 tensors but config.json declares no FP8 quantization_config "
                "(quant_method fp8 with weight_block_size); their scales are unknown"
            )
        return files
    return Fp8BlockFiles(files, block)


def source_reading_notes(files: Any, dropped: list[str]) -> dict[str, Any]:
    """What the run did to its source checkpoint beyond reading it: FP8 weights dequantized with
    their block scales, tensors dropped as transformers drops them (stated, never silent)."""
    notes: dict[str, Any] = {}
    said = []
    if isinstance(files, Fp8BlockFiles):
        notes["fp8_block_scaled"] = {"weights": len(files.scaled), "block": list(files.block)}
        said.append(
            f"the source stores {len(files.scaled)} weights in FP8 with {files.block[0]} x "
            f"{files.block[1]} block scales; each is dequantized to bf16 as its block is read"
        )
    if dropped:
        notes["dropped"] = {"tensors": len(dropped), "first": dropped[0]}
        said.append(
            f"{len(dropped)} source tensors are not part of the transformers model and are "
            f"dropped as transformers drops them (first: {dropped[0]}; e.g. a multi-token-"
            "prediction layer): the output has no such layer"
        )
    if said:
        notes["said"] = said
    return notes
