"""Every method configuration under one import, for users: ``from quantlab.config import
GPTQConfig``.

Each config class is declared beside its method (``quantlab/methods/<method>``), and
:func:`config_from_dict` lives with the method table (:mod:`quantlab.methods.registry`); this
module only re-exports them. Nothing inside quantlab imports it.
"""

from __future__ import annotations

from quantlab.methods.awq.config import AWQConfig
from quantlab.methods.base import CalibConfig, GroupwiseIntConfig
from quantlab.methods.bitstack.config import BitStackConfig
from quantlab.methods.fair_gptq import FairGPTQConfig
from quantlab.methods.gptq import GPTQConfig
from quantlab.methods.pvq import PVQConfig
from quantlab.methods.registry import config_from_dict
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.ternary import TernaryConfig

__all__ = [
    "AWQConfig",
    "BitStackConfig",
    "CalibConfig",
    "FairGPTQConfig",
    "GPTQConfig",
    "GroupwiseIntConfig",
    "PVQConfig",
    "RTNConfig",
    "TernaryConfig",
    "config_from_dict",
]
