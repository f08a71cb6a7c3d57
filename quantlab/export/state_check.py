"""The strict comparison every checkpoint loader makes before a single value is copied: the
tensors a file (or a converted state dict) holds against the tensors the model built from
``config.json`` expects, key by key, shape by shape, dtype by dtype.

Rules:

* every tensor the model holds must be present; of tensors the model ties together (a head tied
  to the embedding) one is enough;
* nothing unexpected: a tensor the model has no place for is an error (transformers would drop it
  silently), except names the model class itself declares ignorable
  (``_keys_to_ignore_on_load_unexpected``, as transformers does);
* shapes equal;
* dtypes: the packed tensors of a quantized layer, and every integer tensor, exactly as the
  format defines them (an F32 ``qweight`` or BF16 scales where the spec says float16 would be
  cast or reinterpreted); other float tensors (embeddings, norms, biases) any of F16/BF16/F32/F64,
  since they are cast to the load dtype like transformers does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import TensorInfo
from quantlab.formats.tensor_layout import SAFETENSORS_DTYPES
from quantlab.nn.registry import module_spec, quantized_modules

__all__ = ["check_state_matches_model", "expected_tensors"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_LISTED = 5


def expected_tensors(
    model: nn.Module,
) -> tuple[dict[str, TensorInfo], dict[str, torch.dtype], list[list[str]]]:
    """What a checkpoint of ``model`` must hold: ``(infos by key, the dtype of each key whose
    dtype must match exactly, groups of keys that share one tensor)``. Works on meta-device
    models."""
    state = model.state_dict(keep_vars=True)
    infos = {key: TensorInfo.of(t) for key, t in state.items()}
    exact = {key: info.dtype for key, info in infos.items() if not info.dtype.is_floating_point}
    for name, module in quantized_modules(model):
        prefix = f"{name}." if name else ""
        # The format's own table (quantlab.nn.registry): None means any float dtype will do.
        for suffix, dtype in type(module).checkpoint_tensors(module_spec(module)).items():
            if dtype is not None:
                exact[f"{prefix}{suffix}"] = SAFETENSORS_DTYPES[dtype]
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    # Ties the model declares but has not made yet (transformers ties after loading the weights).
    group_of = {key: gid for gid, keys in groups.items() for key in keys}
    for target, origin in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        a, b = group_of.get(target), group_of.get(origin)
        if a is not None and b is not None and a != b:
            groups[b].extend(groups.pop(a))
            group_of.update(dict.fromkeys(groups[b], b))
    return infos, exact, list(groups.values())


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def check_state_matches_model(
    model: nn.Module, found: Mapping[str, TensorInfo], source: object
) -> None:
    """Raise :class:`CheckpointError` naming ``source`` (a file or directory) and every kind of
    mismatch between ``found`` and what ``model`` expects (see the module docstring)."""
    infos, exact, groups = expected_tensors(model)
    missing = [group[0] for group in groups if not any(key in found for key in group)]
    ignorable = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    ]
    unexpected = [
        key for key in found if key not in infos and not any(p.search(key) for p in ignorable)
    ]
    wrong: list[str] = []
    for key, have in found.items():
        want = infos.get(key)
        if want is None:
            continue
        if have.shape != want.shape:
            wrong.append(f"{key} is {have.describe()}, the model expects shape {list(want.shape)}")
        elif key in exact and have.dtype != exact[key]:
            stored = TensorInfo(want.shape, exact[key]).describe()
            wrong.append(f"{key} is {have.describe()}, the format stores {stored}")
        elif key not in exact and have.dtype not in _FLOATS:
            wrong.append(f"{key} is {have.describe()}, expected a float tensor")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listed(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the model has no place for: {_listed(unexpected)}"
        )
    if wrong:
        problems.append(_listed(wrong))
    if problems:
        raise CheckpointError(
            f"{source}: the tensors do not match the model config.json describes: "
            + "; ".join(problems)
            + ". Re-export the checkpoint, or restore the config.json it was written with"
        )
