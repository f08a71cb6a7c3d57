"""Teach ``transformers.AutoModel*.from_pretrained`` to load quantlab checkpoints.

After :func:`register`, a directory written by
:func:`quantlab.export.quantlab_checkpoint.save_quantized` loads with plain
``AutoModelForCausalLM.from_pretrained(path)``: transformers builds the model on the meta device,
our quantizer swaps the listed linears for :class:`~quantlab.nn.groupwise_int_linear.QuantLinear`
(or the layer of each module's format), and transformers streams the packed tensors in. The checks
before and after are :mod:`quantlab.export.load`'s: of export, this module imports only that
module and the schema.

The load is as strict as ``quantlab.load`` (docs/reliability.md): the config's module specs are
checked field by field when transformers parses it; before any weight is read the safetensors
headers are checked against the model (every tensor present, nothing unexpected, shapes and the
packed tensors' dtypes exact) and the files against the checksums quantlab recorded; after the
load every layer checks its values (scales finite and positive, valid codes) and every float
tensor is checked finite. A failure is a :class:`~quantlab.export.errors.CheckpointError`.
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

from quantlab.export.load import finish_model_after_weights, prepare_model_for_weights
from quantlab.export.schema import QUANT_METHOD, module_specs
from quantlab.formats.groupwise_int import FORMAT_NAME, FORMAT_VERSION

__all__ = ["QUANT_METHOD", "QuantlabConfig", "QuantlabHfQuantizer", "register"]


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
        self.modules: dict[str, dict[str, Any]] = {}
        if modules is not None:
            # The same checks as quantlab.load (raises CheckpointError naming the module).
            qcfg = {"format": format, "format_version": format_version, "modules": modules}
            self.modules = module_specs(qcfg, "quantization_config")
        self.config = dict(config or {})
        self.extra = kwargs

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

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        prepare_model_for_weights(model, self.quantization_config.modules, checkpoint_files)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        finish_model_after_weights(model, getattr(model, "name_or_path", "checkpoint"))
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
