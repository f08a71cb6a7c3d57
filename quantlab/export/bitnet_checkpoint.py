"""Native BitNet b1.58 checkpoints in the Hugging Face layout (``quant_method: "bitnet"``, e.g.
``microsoft/bitnet-b1.58-2B-4T``) loaded into quantlab's :class:`TernaryLinear` layers.

The HF layout (transformers ``integrations/bitnet.py``), per converted linear ``<name>`` of
shape ``[N, K]``:

* ``quantization_mode: "offline"`` (packed): ``<name>.weight`` uint8 ``[ceil(N / 4), K]`` packed
  **along the output dimension**: with ``R = ceil(N / 4)``, output row ``n = i * R + r`` sits in
  packed row ``r`` at bits ``2i .. 2i+1`` as the code ``t + 1`` in ``{0, 1, 2}``;
  ``<name>.weight_scale`` ``[1]`` in the model dtype. ``linear_class: "bitlinear"`` divides by
  that scale (``W = t / weight_scale``), ``"autobitlinear"`` (the 2B-4T release) multiplies
  (``W = t * weight_scale``).
* ``quantization_mode: "online"`` (``linear_class: "autobitlinear"``, the ``-bf16`` masters):
  ``<name>.weight`` holds float master weights that the model ternarizes on every forward with
  BitNet's per-tensor absmean; quantlab does that once, with the same arithmetic, so the trits and
  scale are those the model computes.

Activations are BitNet's per-token int8 absmax in both, which is also :class:`TernaryLinear`'s
arithmetic, so the loaded model computes what transformers' BitNet layers compute (up to fp32
rounding order). Converted modules become ``i2``-packed ternary layers with one fp32 scale per
tensor; everything else (embeddings, norms, ``lm_head``) loads as stored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.errors import CheckpointError
from quantlab.export.foreign_layout import config_field
from quantlab.export.model_fill import instantiate_quantized
from quantlab.export.schema import read_quantization_config
from quantlab.formats.ternary import FORMAT_NAME, TernaryResult, pack
from quantlab.formats.ternary_packing import PER_TENSOR
from quantlab.solvers.ternary import absmean_ternarize

__all__ = ["BITNET_QUANT_METHOD", "bitnet_modules", "load_bitnet", "unpack_hf_bitnet"]

BITNET_QUANT_METHOD = "bitnet"
_LINEAR_CLASSES = ("bitlinear", "autobitlinear")
_MODES = ("offline", "online")


def unpack_hf_bitnet(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """HF BitNet's packed ``weight`` uint8 ``[ceil(N / 4), K]`` -> trits int8 ``[N, K]``.

    Raises ``ValueError`` on a wrong shape or the invalid code 3 in a real row.
    """
    rows = -(-out_features // 4)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != rows:
        raise ValueError(
            f"packed BitNet weight must be uint8 [{rows}, K] for {out_features} output rows, got "
            f"{packed.dtype} {list(packed.shape)}"
        )
    shifts = torch.arange(4, dtype=torch.int32).view(4, 1, 1) * 2
    codes = (packed.to(torch.int32).unsqueeze(0) >> shifts) & 3  # [4, R, K]: row i * R + r
    codes = codes.reshape(4 * rows, packed.shape[1])[:out_features]
    if bool((codes == 3).any()):
        raise ValueError(f"packed BitNet weight holds {int((codes == 3).sum())} invalid codes (3)")
    return (codes - 1).to(torch.int8)


def _should_skip(name: str, patterns: list[str]) -> bool:
    # transformers' should_convert_module: a pattern matches from the start up to a module
    # boundary, as a regex with that boundary, or as a suffix.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def bitnet_modules(
    model: nn.Module, quantization_config: dict[str, Any], tensor_dtypes: dict[str, torch.dtype]
) -> list[str]:
    """Paths of the linears the checkpoint stores ternary.

    Offline checkpoints say it themselves (a uint8 ``weight`` with a ``weight_scale``); online
    ones follow transformers' rule: every ``nn.Linear`` but ``modules_to_not_convert`` (or, when
    that is null, the output embedding).
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if quantization_config.get("quantization_mode", "offline") == "offline":
        return [n for n in linears if tensor_dtypes.get(f"{n}.weight") == torch.uint8]
    skip = quantization_config.get("modules_to_not_convert")
    if skip is None:
        out = model.get_output_embeddings()
        skip = [n for n, m in model.named_modules() if m is out]
    return [n for n in linears if not _should_skip(n, list(skip))]


def _convert(
    name: str,
    linear: nn.Linear,
    state: dict[str, torch.Tensor],
    mode: str,
    linear_class: str,
    source: Path,
) -> TernaryResult:
    weight = state.pop(f"{name}.weight", None)
    if weight is None:
        raise CheckpointError(f"{source}: tensor {name}.weight is missing")
    n, k = linear.out_features, linear.in_features
    if mode == "online":
        if tuple(weight.shape) != (n, k) or not weight.dtype.is_floating_point:
            raise CheckpointError(
                f"{source}: {name}.weight must be float [{n}, {k}] (online BitNet masters), got "
                f"{weight.dtype} {list(weight.shape)}"
            )
        state.pop(f"{name}.weight_scale", None)
        # BitNet's own per-tensor absmean, in fp32 as transformers computes it.
        return absmean_ternarize(weight.to(torch.float32), PER_TENSOR, torch.float32, name)
    scale = state.pop(f"{name}.weight_scale", None)
    if scale is None or scale.numel() != 1:
        raise CheckpointError(
            f"{source}: {name}.weight_scale must hold one value, got "
            f"{None if scale is None else list(scale.shape)}"
        )
    if tuple(weight.shape) != (-(-n // 4), k):
        raise CheckpointError(
            f"{source}: {name}.weight must be uint8 [{-(-n // 4)}, {k}] for a [{n}, {k}] layer, "
            f"got {weight.dtype} {list(weight.shape)}"
        )
    try:
        t = unpack_hf_bitnet(weight, n)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {name}: {exc}") from exc
    value = float(scale.reshape(()).to(torch.float32))
    if not (value > 0 and torch.isfinite(torch.tensor(value))):
        raise CheckpointError(f"{source}: {name}.weight_scale is {value}, expected > 0")
    # fp32 keeps a bf16 scale exact, and 1 / scale as close as fp32 allows.
    s = value if linear_class == "autobitlinear" else 1.0 / value
    return TernaryResult(t=t, scales=torch.tensor([[s]], dtype=torch.float32), group_size=0)


def load_bitnet(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    packing: str = "i2",
) -> nn.Module:
    """Load a native BitNet b1.58 checkpoint (HF layout) with :class:`TernaryLinear` layers.

    Args:
        path: the checkpoint directory (``config.json`` with ``quantization_config.quant_method
            == "bitnet"``, ``model.safetensors`` or shards with an index).
        device, dtype: where and in which dtype the model runs (activations, norms, embeddings).
        packing: ``"i2"`` or ``"tq1"`` for the ternary layers.

    Returns:
        The transformers model (``BitNetForCausalLM`` or whatever ``config.json`` names), ready to
        evaluate or to save with :func:`quantlab.export.quantlab_checkpoint.save_quantized`.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    cfg_path, qcfg = read_quantization_config(root, BITNET_QUANT_METHOD, "a BitNet")
    linear_class = config_field(qcfg, cfg_path, "linear_class", str, default="bitlinear")
    mode = config_field(qcfg, cfg_path, "quantization_mode", str, default="offline")
    skip = qcfg.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(p, str) for p in skip)):
        raise CheckpointError(f"{cfg_path}: modules_to_not_convert must be a list of strings")
    if linear_class not in _LINEAR_CLASSES or mode not in _MODES:
        raise CheckpointError(
            f"{cfg_path}: linear_class {linear_class!r} / quantization_mode {mode!r}; BitNet "
            f"checkpoints have linear_class in {_LINEAR_CLASSES} and mode in {_MODES}"
        )
    if mode == "online" and linear_class != "autobitlinear":
        raise CheckpointError(f"{cfg_path}: online quantization needs linear_class autobitlinear")
    if config_field(qcfg, cfg_path, "use_rms_norm", bool, default=False):
        raise CheckpointError(
            f"{cfg_path}: use_rms_norm=True (an RMSNorm inside every BitLinear) is not supported "
            "by quantlab's BitNet import"
        )
    with CheckpointFiles(root) as files:
        state = {key: files.get(key) for key in files.tensors}
        tensor_dtypes = {key: info.dtype for key, info in files.tensors.items()}
        source = files.source

    # The float model's module tree, to know every linear's shape and which ones are ternary.
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(root)
    hf_config.quantization_config = None
    del hf_config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    names = bitnet_modules(skeleton, qcfg, tensor_dtypes)
    if not names:
        raise CheckpointError(f"{source}: no ternary (BitNet) linears found")
    specs = {}
    for name in names:
        linear = skeleton.get_submodule(name)
        result = _convert(name, linear, state, mode, linear_class, source)
        packed = pack(result, packing, "float32")
        state.update({f"{name}.{k}": v for k, v in packed.tensors().items()})
        specs[name] = {
            "format": FORMAT_NAME,
            "packing": packing,
            "group_size": PER_TENSOR,
            "scale_dtype": "float32",
        }
    for key, tensor in list(state.items()):
        if tensor.dtype.is_floating_point and not key.endswith(".scales"):
            state[key] = tensor.to(dtype)
    del skeleton
    model = instantiate_quantized(root, state, specs, dtype)
    return model.to(device)
