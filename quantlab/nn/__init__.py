"""Quantized modules."""

from quantlab.nn.linear import QuantLinear

__all__ = ["QuantLinear"]
