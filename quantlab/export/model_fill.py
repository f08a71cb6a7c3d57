"""Building the model a checkpoint's config.json describes and filling it from checked tensors:
the one path every loader (quantlab's layout, GPTQ, AWQ, BitNet, BitStack budgets) ends in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import TensorInfo
from quantlab.export.state_check import check_state_matches_model
from quantlab.nn.groupwise_int_experts import stack_groupwise_experts
from quantlab.nn.registry import quantized_modules

__all__ = [
    "build_model",
    "checked_after_load",
    "fill_model",
    "finish_loaded_layers",
    "instantiate_quantized",
]


def build_model(
    root: Path, specs: dict[str, dict[str, Any]], dtype: torch.dtype, meta: bool
) -> nn.Module:
    """The transformers model ``root/config.json`` describes, with an empty quantized layer of
    ``specs[path]``'s format at each listed path: on the meta device (``meta``: shapes and
    dtypes only, for checks) or allocated but not initialised (every tensor is then filled)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from quantlab.models.arch import linearize
    from quantlab.nn.swap import swap_in_empty

    cfg_path = root / "config.json"
    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as exc:  # noqa: BLE001 - a hand-edited config can make transformers raise anything
        raise CheckpointError(f"{cfg_path}: transformers cannot read this config: {exc}") from exc
    config.quantization_config = None
    del config.quantization_config
    try:
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - as above, for values only the model's init checks
        raise CheckpointError(
            f"{cfg_path}: cannot build the model it describes "
            f"({getattr(config, 'model_type', '?')}): {exc}"
        ) from exc
    # Fused experts as one linear per expert projection: the names checkpoints store.
    linearize(model)
    for name, spec in specs.items():
        try:
            swap_in_empty(model, name, spec)
        except ValueError as exc:
            raise CheckpointError(f"{cfg_path}: module {name}: {exc}") from exc
    # Tie now (no_init_weights skips it), so the checks see tied tensors as one.
    model.tie_weights()
    return model


def fill_model(
    root: Path,
    found: Mapping[str, TensorInfo],
    get: Callable[[str], torch.Tensor],
    specs: dict[str, dict[str, Any]],
    dtype: torch.dtype,
    source: object,
) -> nn.Module:
    """Build the model of ``root/config.json`` with ``specs``' quantized layers and fill every
    tensor from ``get(key)`` after checking ``found`` (the keys, shapes and dtypes ``get`` will
    deliver) against it: the one path every loader ends in. ``source`` (a file or directory)
    is named in errors.

    Values are checked as they are copied: float tensors finite, tied tensors stored twice
    equal, and each quantized layer's own checks (``after_load``: scales finite and positive,
    valid codes), so nothing of the model is left uninitialised or silently wrong.
    """
    model = build_model(root, specs, dtype, meta=False)
    check_state_matches_model(model, found, source)
    filled: dict[int, str] = {}
    with torch.no_grad():
        for key, target in model.state_dict(keep_vars=True).items():
            if key not in found:
                continue  # a tied alias whose twin is stored (checked above)
            value = get(key)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{source}: {key} holds NaN or Inf values")
            twin = filled.get(id(target))
            if twin is not None:
                if not torch.equal(target, value.to(target.dtype)):
                    raise CheckpointError(
                        f"{source}: {key} and {twin} are tied in the model but stored with "
                        "different values"
                    )
                continue
            target.copy_(value)
            filled[id(target)] = key
    finish_loaded_layers(model, source)
    model.tie_weights()
    _load_generation_config(model, root)
    return model.eval()


def finish_loaded_layers(model: nn.Module, source: object) -> None:
    """Run every quantized layer's ``after_load`` (dtype fix-ups, its format's value checks,
    kernel layouts) once its tensors are in, then give mixtures whose experts are groupwise
    integers of one encoding their grouped path (:func:`stack_groupwise_experts`); a
    ``ValueError`` becomes a :class:`CheckpointError` naming ``source`` and the module."""
    for name, layer in quantized_modules(model):
        if hasattr(layer, "after_load"):
            try:
                layer.after_load()
            except ValueError as exc:
                raise CheckpointError(f"{source}: module {name}: {exc}") from exc
    stack_groupwise_experts(model)


def checked_after_load(source: object) -> Callable[[nn.Module, str], None]:
    """The checks a lazily loaded part of a quantized model gets once its tensors are in (a
    :class:`~quantlab.export.lazy_model.LazyModel`'s ``after_load``): float tensors finite, and
    each quantized layer's :func:`finish_loaded_layers`; errors name ``source``."""

    def check(module: nn.Module, prefix: str) -> None:
        base = f"{prefix}." if prefix else ""
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{source}: {base}{key} holds NaN or Inf values")
        finish_loaded_layers(module, source)

    return check


def _load_generation_config(model: nn.Module, root: Path) -> None:
    """Give the model the checkpoint's generation settings (what ``from_pretrained`` does)."""
    if not (root / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(root)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{root / 'generation_config.json'}: unreadable: {exc}") from exc


def instantiate_quantized(
    root: Path,
    state: dict[str, torch.Tensor],
    specs: dict[str, dict[str, Any]],
    dtype: torch.dtype,
    source: object = None,
) -> nn.Module:
    """:func:`fill_model` from a state dict in memory (loaders of foreign layouts, once they have
    converted the tensors to quantlab's formats)."""
    found = {key: TensorInfo.of(t) for key, t in state.items()}
    return fill_model(root, found, state.__getitem__, specs, dtype, source or root)
