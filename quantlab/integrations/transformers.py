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

from quantlab.export.checkpoint import module_defaults
from quantlab.formats.groupwise_int import FORMAT_NAME, FORMAT_VERSION
from quantlab.nn.registry import FormatError, layer_class, quantized_modules
from quantlab.nn.swap import swap_in_empty

__all__ = ["QUANT_METHOD", "QuantlabConfig", "QuantlabHfQuantizer", "register"]

QUANT_METHOD = "quantlab"


class QuantlabConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantlab checkpoint.

    Attributes:
        format: the layer format of every module (``groupwise_int``, ...), or ``"mixed"``; modules
            record their own ``format`` and ``format_version``.
        format_version: layout version of that format.
        method: the method that produced the weights (``rtn``, ``gptq``, ...).
        modules: ``{module path: spec}`` for every quantized module (the spec's fields are its
            format's, see :mod:`quantlab.nn.registry`).
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
        defaults = module_defaults({"format": format, "format_version": format_version})
        self.modules = {name: {**defaults, **spec} for name, spec in (modules or {}).items()}
        self.config = dict(config or {})
        self.extra = kwargs
        for name, spec in self.modules.items():
            try:
                layer_class(spec)
            except FormatError as exc:
                raise ValueError(f"module {name}: {exc}") from exc

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
            swap_in_empty(model, name, spec)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for _, module in quantized_modules(model):
            if hasattr(module, "after_load"):
                module.after_load()
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
