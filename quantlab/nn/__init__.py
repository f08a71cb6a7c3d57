"""Quantized modules."""

from quantlab.nn.groupwise_int_linear import QuantLinear

__all__ = ["QuantLinear"]
