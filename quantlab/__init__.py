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
    "replace_linear",
    "resize",
    "save",
    "__version__",
]

if TYPE_CHECKING:
    import torch

    from quantlab.nn.linear import QuantLinear
    from quantlab.pipeline import QuantizationReport


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
    from quantlab.methods import get_method
    from quantlab.pipeline import quantize_model

    config = get_method(method).config_cls(**options)
    return quantize_model(model, config, tokenizer, calib, device, progress)


def load(
    path: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: str | int | float | None = None,
) -> Any:
    """Load a quantized checkpoint directory: quantlab's own layout, or the GPTQ or AWQ (GEMM)
    layout. A BitStack checkpoint loads its largest configuration within ``memory_budget``
    (bytes, or a string such as ``"350MB"``; default: all blocks) and can be resized later with
    ``model.resize(budget)``. A native BitNet b1.58 checkpoint (HF ``quant_method: "bitnet"``)
    loads with quantlab's ternary layers."""
    import torch

    from quantlab.export.bitstack_checkpoint import is_bitstack_checkpoint
    from quantlab.export.checkpoint import load_quantized
    from quantlab.models.loading import checkpoint_kind

    if is_bitstack_checkpoint(path):
        from quantlab.export.bitstack_checkpoint import load_bitstack

        return load_bitstack(path, memory_budget, device=device, dtype=dtype or torch.float32)
    if memory_budget is not None:
        raise ValueError(f"memory_budget applies to BitStack checkpoints only; {path} is not one")

    if checkpoint_kind(str(path)) == "gptq":
        from quantlab.export.gptq_checkpoint import load_gptq

        return load_gptq(path, device=device, dtype=dtype or torch.float32)
    if checkpoint_kind(str(path)) == "awq":
        from quantlab.export.awq_checkpoint import load_awq

        return load_awq(path, device=device, dtype=dtype or torch.float32)
    if checkpoint_kind(str(path)) == "bitnet":
        from quantlab.export.bitnet_checkpoint import load_bitnet

        return load_bitnet(path, device=device, dtype=dtype or torch.float32)
    return load_quantized(path, device=device, dtype=dtype or torch.float32)


def save(model: Any, out_dir: str, report: QuantizationReport, tokenizer: Any = None) -> Any:
    """Save a model quantized by :func:`quantize` (``report`` is what it returned)."""
    from quantlab.export.checkpoint import save_quantized

    return save_quantized(model, out_dir, report.method, report.config, tokenizer, report.to_dict())


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
        from quantlab.nn.linear import QuantLinear

        return QuantLinear
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")
