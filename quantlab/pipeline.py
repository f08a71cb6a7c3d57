"""Whole-model entry points: :func:`quantize_model` (any registered method),
:func:`quantize_checkpoint` (the same, streamed block by block from a checkpoint directory into a
new one) and :func:`replace_linear` (RTN on any torch model).

Nothing in quantlab imports this module but the public API and the CLI: each method's
orchestration lives in :mod:`quantlab.methods`, what methods share in
:mod:`quantlab.methods.base` (re-exported here: :class:`QuantizationReport` and
:class:`LayerReport`, the report :func:`quantize_model` returns).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.calib.blocks import WeightSource
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.base import (
    CalibConfig,
    LayerReport,
    MethodContext,
    QuantizationReport,
    packed_layer,
)
from quantlab.methods.registry import get_method
from quantlab.methods.rtn import RTNConfig
from quantlab.models.arch import excluded
from quantlab.nn.swap import set_submodule
from quantlab.solvers.rtn import rtn_quantize

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "quantize_checkpoint",
    "quantize_model",
    "replace_linear",
]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: Any,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    samples: torch.Tensor | None = None,
    weights: WeightSource | None = None,
    block_sink: Callable[[int, nn.Module], None] | None = None,
) -> QuantizationReport:
    """Quantize a transformers causal LM in place; its block linears become quantized layers
    (:class:`QuantLinear` or the method's own layer format).

    Args:
        model: a model whose architecture :func:`quantlab.models.arch.resolve` knows.
        config: the method's configuration (``RTNConfig``, ``GPTQConfig``, ...; any method of
            :func:`quantlab.methods.methods`).
        tokenizer: needed by calibrated methods to tokenize the calibration text.
        calib: calibration options (defaults to :class:`CalibConfig`'s defaults).
        device: where blocks are processed (default: where the model is).
        samples: calibration token ids ``[S, L]`` to use instead of drawing ``calib``'s windows
            from its text source (then no tokenizer is needed).
        weights: streams ``model``'s weights from its checkpoint one block at a time (``model``
            then lives on the meta device, e.g. :class:`quantlab.export.lazy_model.LazyModel`);
            ``device`` must be given.
        block_sink: receives ``(index, block)`` once each block is quantized, before a streamed
            block leaves memory (a streaming export writes it there).
    """
    start = time.perf_counter()
    if device is None:
        if weights is not None:
            raise ValueError("a streamed model (weights=...) needs an explicit device")
        device = next(model.parameters()).device
    device = torch.device(device)
    calib = calib or CalibConfig()
    report = QuantizationReport(
        method=config.method,
        config=config.to_dict(),
        calib=calib.to_dict() if config.needs_calibration else None,
    )
    if samples is not None and config.needs_calibration:
        report.calib = {"source": "given token ids", "shape": list(samples.shape)}
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(
            f"method {config.method!r} expects a {method.config_cls.__name__}, got "
            f"{type(config).__name__}"
        )
    context = MethodContext(
        tokenizer,
        calib,
        report,
        device,
        progress,
        given_samples=samples,
        weights=weights,
        block_sink=block_sink,
    )
    method.run(model, config, context)
    report.seconds = time.perf_counter() - start
    return report


def quantize_checkpoint(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: Any,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    samples: torch.Tensor | None = None,
) -> QuantizationReport:
    """Quantize the checkpoint in directory ``source`` into a quantlab checkpoint at ``out_dir``,
    one decoder block at a time: the model is built on the meta device, each block is read from
    the (memory-mapped, possibly sharded) safetensors files in ``dtype`` when it is processed,
    written to ``out_dir``'s shards once quantized, and released; the tensors no method touches
    (embedding, final norm, head) are copied in their stored dtype. Memory: about one block in
    ``dtype`` plus the calibration activations, whatever the model's size.

    The output is written atomically (the previous content of ``out_dir``, if quantlab wrote it,
    stays until the new checkpoint is complete). Methods that cannot stream yet refuse at the
    start (:func:`quantlab.methods.base.require_resident`).
    """
    from transformers import AutoConfig

    from quantlab.export.checkpoint_files import CheckpointFiles, parse_size
    from quantlab.export.lazy_model import LazyModel, empty_model
    from quantlab.export.streaming import StreamingCheckpoint
    from quantlab.models.arch import resolve

    shard_bytes = parse_size(max_shard_size)
    files = CheckpointFiles(source)
    lazy = LazyModel(empty_model(AutoConfig.from_pretrained(source)), files, dtype, device)
    spec = resolve(lazy.model)
    with StreamingCheckpoint(
        out_dir, files, spec.blocks, shard_bytes, inputs=(Path(source),)
    ) as out:
        report = quantize_model(
            lazy.model,
            config,
            tokenizer,
            calib,
            device,
            progress,
            samples,
            weights=lazy,
            block_sink=out.write_block,
        )
        out.finish(lazy.model, config.method, config.to_dict(), tokenizer, report.to_dict())
    files.close()
    return report


@torch.no_grad()
def replace_linear(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = False,
    scale_dtype: str = "float16",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Swap every matching ``nn.Linear`` of any torch model for an RTN-quantized
    :class:`QuantLinear`.

    Names are matched with shell-style patterns against the module's dotted path. Layers whose
    ``in_features`` the group size does not divide raise ``ValueError`` (exclude them or pick
    another group size). Returns the names of the replaced modules.
    """
    config = RTNConfig(bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatch(name, p) for p in include)
        and not excluded(name, exclude)
    ]
    for name in targets:
        linear = model.get_submodule(name)
        result = rtn_quantize(
            linear.weight, bits, group_size, sym, dtype_from_name(scale_dtype), name=name
        )
        set_submodule(model, name, packed_layer(result, linear, config, name))
    return targets
