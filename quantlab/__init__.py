"""quantlab: low-bit quantization and compression of LLM weights.

Public API (imported lazily so ``import quantlab`` loads neither transformers nor CUDA):

* :func:`quantize` - quantize a transformers causal LM in place (RTN, GPTQ, ...).
* :func:`load` - load a quantlab checkpoint directory as a transformers model (BitStack
  checkpoints to a ``memory_budget``).
* :func:`resize` - grow or shrink a loaded BitStack model to another memory budget, in place.
* :func:`save` - write a quantized model as safetensors + config.json, atomically.
* :func:`replace_linear` - swap ``nn.Linear`` layers of any torch model for RTN ``QuantLinear``.
* :class:`QuantLinear` - the drop-in quantized linear layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "QuantLinear",
    "load",
    "quantize",
    "quantize_checkpoint",
    "replace_linear",
    "resize",
    "save",
    "__version__",
]

if TYPE_CHECKING:
    import torch

    from quantlab.methods.base import QuantizationReport
    from quantlab.nn.groupwise_int_linear import QuantLinear


def quantize(
    model: Any,
    method: str = "rtn",
    tokenizer: Any = None,
    calib: Any = None,
    device: Any = None,
    progress: bool = True,
    **options: Any,
) -> QuantizationReport:
    """Quantize ``model`` in place with ``method`` (options are that method's config fields)."""
    from quantlab.methods.registry import get_method
    from quantlab.pipeline import quantize_model

    config = get_method(method).config_cls(**options)
    return quantize_model(model, config, tokenizer, calib, device, progress)


def quantize_checkpoint(
    source: str,
    out_dir: str,
    method: str = "rtn",
    tokenizer: Any = None,
    calib: Any = None,
    device: Any = "cpu",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    export_format: str = "quantlab",
    activation_budget: str | int | None = None,
    offload_dir: str | None = None,
    check_memory: bool = True,
    **options: Any,
) -> QuantizationReport:
    """Quantize the checkpoint directory ``source`` into a checkpoint at ``out_dir`` (layout
    ``export_format``: quantlab, gptq or awq), streamed one block at a time (a model larger than
    memory quantizes in about one block's memory); ``dtype`` is the compute dtype of a block
    (default: the checkpoint's own, :func:`quantlab.export.model_source.checkpoint_dtype`). The
    run's memory is planned first and a run that cannot fit is refused; calibration activations
    past ``activation_budget`` spill to ``offload_dir``. See
    :func:`quantlab.pipeline.quantize_checkpoint`."""
    from quantlab.methods.registry import get_method
    from quantlab.pipeline import quantize_checkpoint as _quantize_checkpoint

    config = get_method(method).config_cls(**options)
    return _quantize_checkpoint(
        source,
        out_dir,
        config,
        tokenizer,
        calib,
        device,
        dtype,
        max_shard_size,
        progress,
        export_format=export_format,
        activation_budget=activation_budget,
        offload_dir=offload_dir,
        check_memory=check_memory,
    )


def load(
    path: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: str | int | float | None = None,
    verify: bool = True,
) -> Any:
    """Load a quantized checkpoint directory: quantlab's own layout, or the GPTQ or AWQ (GEMM)
    layout. A BitStack checkpoint loads its largest configuration within ``memory_budget``
    (bytes, or a string such as ``"350MB"``; default: all blocks) and can be resized later with
    ``model.resize(budget)``. A native BitNet b1.58 checkpoint (HF ``quant_method: "bitnet"``)
    loads with quantlab's ternary layers.

    Loading is strict (docs/reliability.md): every tensor the model needs must be present with
    the shape and dtype its config implies, nothing unexpected, module settings typed and
    consistent with the tensors, scales finite and positive; otherwise
    :class:`~quantlab.export.errors.CheckpointError` names the file, the field and the fix.
    ``verify`` also checks the files against the checksums quantlab recorded when it wrote them.
    """
    from quantlab.export.load import load_checkpoint

    return load_checkpoint(path, device, dtype, memory_budget, verify)


def save(
    model: Any,
    out_dir: str,
    report: QuantizationReport,
    tokenizer: Any = None,
    max_shard_size: str | int = "5GB",
    format: str = "quantlab",  # noqa: A002 (the CLI's --format)
) -> Any:
    """Save a model quantized by :func:`quantize` (``report`` is what it returned), atomically and
    with a checksum manifest, in safetensors shards of at most ``max_shard_size`` (one
    ``model.safetensors`` when it fits). ``out_dir`` may be new, empty, or a checkpoint quantlab
    wrote (then replaced once the new one is complete); a file or another non-empty directory
    there is refused (docs/reliability.md). ``format``: ``"quantlab"``, or for the
    groupwise-integer methods ``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` (the layouts
    transformers and vLLM load; docs/formats.md)."""
    from quantlab.export.checkpoint_files import parse_size
    from quantlab.export.quantlab_checkpoint import save_quantized, write_in_layout

    if format != "quantlab":
        from quantlab.export.save import layout_for
        from quantlab.methods.registry import get_method

        allowed = get_method(report.method).export_formats
        if format not in allowed:
            raise ValueError(
                f"{report.method} checkpoints cannot be written as {format!r} "
                f"(it writes: {', '.join(allowed)})"
            )
        layout = layout_for(format, report.method, report.config)
        return write_in_layout(
            model, out_dir, layout, tokenizer, report.to_dict(), parse_size(max_shard_size)
        )
    return save_quantized(
        model,
        out_dir,
        report.method,
        report.config,
        tokenizer,
        report.to_dict(),
        parse_size(max_shard_size),
    )


def resize(model: Any, memory_budget: str | int | float) -> int:
    """See :func:`quantlab.export.bitstack_checkpoint.resize` (same as ``model.resize``)."""
    from quantlab.export.bitstack_checkpoint import resize as _resize

    return _resize(model, memory_budget)


def replace_linear(model: Any, **options: Any) -> list[str]:
    """See :func:`quantlab.pipeline.replace_linear`."""
    from quantlab.pipeline import replace_linear as _replace

    return _replace(model, **options)


def __getattr__(name: str) -> Any:
    if name == "QuantLinear":
        from quantlab.nn.groupwise_int_linear import QuantLinear

        return QuantLinear
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")
