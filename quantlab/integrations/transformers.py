"""Teach ``transformers.AutoModel*.from_pretrained`` to load quantlab checkpoints.

After :func:`register` (which ``quantlab.load`` calls), a directory written by
:func:`quantlab.export.checkpoint.save_quantized` loads with plain
``AutoModelForCausalLM.from_pretrained(path)``: transformers builds the model on the meta device,
our quantizer swaps the listed linears for :class:`~quantlab.nn.linear.QuantLinear`, and
transformers streams the packed tensors in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantlab.formats.groupwise_int import FORMAT_NAME, FORMAT_VERSION, dtype_from_name
from quantlab.nn.linear import QuantLinear
from quantlab.nn.swap import swap_in_quant_linear

__all__ = ["QUANT_METHOD", "QuantlabConfig", "QuantlabHfQuantizer", "register"]

QUANT_METHOD = "quantlab"


class QuantlabConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantlab checkpoint.

    Attributes:
        format: packed format name (``groupwise_int``).
        format_version: layout version of that format.
        method: the method that produced the weights (``rtn``, ``gptq``, ...).
        modules: ``{module path: {"bits", "group_size", "sym", "scale_dtype"}}`` for every
            quantized linear.
        config: the method's full configuration (informational).
    """

    def __init__(
        self,
        format: str = FORMAT_NAME,
        format_version: int = FORMAT_VERSION,
        method: str = "rtn",
        modules: dict[str, dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.method = method
        self.modules = dict(modules or {})
        self.config = dict(config or {})
        self.extra = kwargs
        if format != FORMAT_NAME:
            raise ValueError(
                f"unsupported quantlab format {format!r} (this version reads {FORMAT_NAME!r})"
            )
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"quantlab {format} layout version {format_version} is not supported "
                f"(this version reads version {FORMAT_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format": self.format,
            "format_version": self.format_version,
            "method": self.method,
            "config": self.config,
            "modules": self.modules,
            **self.extra,
        }


class QuantlabHfQuantizer(HfQuantizer):
    """Swaps the checkpoint's quantized linears in before transformers loads the weights."""

    requires_calibration = True  # only pre-quantized checkpoints can be loaded this way
    quantization_config: QuantlabConfig

    def __init__(self, quantization_config: QuantlabConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for name, spec in self.quantization_config.modules.items():
            swap_in_quant_linear(
                model,
                name,
                bits=int(spec["bits"]),
                group_size=int(spec["group_size"]),
                sym=bool(spec["sym"]),
                scale_dtype=str(spec.get("scale_dtype", "float16")),
            )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # transformers may cast floating tensors to the requested model dtype; scales keep theirs.
        for module in model.modules():
            if isinstance(module, QuantLinear):
                want = dtype_from_name(module.meta.scale_dtype)
                if module.scales.dtype != want:
                    module.scales = module.scales.to(want)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype


def register() -> None:
    """Register quantlab's config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QuantlabConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QuantlabHfQuantizer
