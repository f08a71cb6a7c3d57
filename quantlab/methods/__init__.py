"""The quantization methods, by name: each one's config class, runner and command-line options.

A method lives in one module of this package, which defines a :class:`Method` and calls
:func:`register_method` at import. The module holds orchestration only (which solver runs on
which layer with which statistics, which layer format results are packed into); the math is in
``quantlab/solvers``, data and statistics in ``calib``, formats in ``quantlab/formats`` and layers
in ``quantlab/nn``. :func:`quantlab.pipeline.quantize_model`, :func:`quantlab.quantize`, config
round trips and the CLI all go through this table, so adding a method touches nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    import torch

    from quantlab.config import CalibConfig
    from quantlab.pipeline import QuantizationReport

__all__ = ["Method", "MethodContext", "get_method", "methods", "register_method"]

# Modules that register the built-in methods, in the order the CLI lists them.
_BUILTIN = (
    "quantlab.methods.rtn",
    "quantlab.methods.gptq",
    "quantlab.methods.awq",
    "quantlab.methods.bitstack",
    "quantlab.methods.ternary",
    "quantlab.methods.fair_gptq",
    "quantlab.methods.pvq",
)
_METHODS: dict[str, Method] = {}


@dataclass
class MethodContext:
    """What a method runner gets besides the model and its config.

    Attributes:
        tokenizer: the model's tokenizer (``None`` when token ids were given).
        calib: calibration options.
        report: the report being filled (append :class:`~quantlab.pipeline.LayerReport` rows,
            put method-specific figures under ``report.details[<method>]``).
        device: where blocks are processed.
        progress: show progress bars.
        given_samples: calibration token ids passed by the caller instead of ``calib``'s text.
    """

    tokenizer: Any
    calib: CalibConfig
    report: QuantizationReport
    device: torch.device
    progress: bool
    given_samples: torch.Tensor | None = None
    _samples: torch.Tensor | None = field(default=None, repr=False)

    def samples(self, method: str) -> torch.Tensor:
        """Calibration token ids ``[S, L]``: the given ones, else ``calib``'s windows of its text
        (drawn once)."""
        if self._samples is None:
            from quantlab.pipeline import calibration_samples_for

            self._samples = calibration_samples_for(
                self.tokenizer, self.calib, method, self.given_samples
            )
        return self._samples


@dataclass(frozen=True)
class Method:
    """One quantization method.

    Attributes:
        name: the ``--method`` / ``quantlab.quantize(method=...)`` name; equals
            ``config_cls.method``.
        config_cls: frozen, validating dataclass with ``method``/``version`` class variables,
            ``needs_calibration`` and ``to_dict()``.
        run: ``run(model, config, context)`` quantizes ``model`` in place.
        config_from_args: builds the config from the parsed ``quantlab quantize`` arguments (the
            shared ones, ``--bits``, ``--group-size``, ... included).
        add_arguments: adds the method's own options to the ``quantize`` parser (prefix them with
            the method's name unless the option is the method's alone by nature).
        export_formats: ``--format`` values its checkpoints can be written in.
        help: one line for ``--help``.
    """

    name: str
    config_cls: type
    run: Callable[[nn.Module, Any, MethodContext], None]
    config_from_args: Callable[[argparse.Namespace], Any]
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    export_formats: tuple[str, ...] = ("quantlab",)
    help: str = ""

    def __post_init__(self) -> None:
        if getattr(self.config_cls, "method", None) != self.name:
            raise ValueError(
                f"method {self.name!r}: {self.config_cls.__name__}.method is "
                f"{getattr(self.config_cls, 'method', None)!r}"
            )


def register_method(method: Method) -> Method:
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method, by name (built-ins imported on first use)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(_METHODS)


def get_method(name: str) -> Method:
    table = methods()
    if name not in table:
        raise ValueError(f"unknown quantization method {name!r}; available: {sorted(table)}")
    return table[name]
