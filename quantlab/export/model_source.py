"""Resolve a ``--model`` argument: ``default``, a local directory, or a Hugging Face hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantlab.export.default_model import DEFAULT_MODEL_NAME, default_model_dir
from quantlab.export.fp8_source import FP8_QUANT_METHOD, open_source_checkpoint
from quantlab.export.lazy_model import LazyModel, empty_model
from quantlab.export.load import LOADABLE_KINDS, checkpoint_kind, load_checkpoint

__all__ = [
    "DTYPES",
    "LoadedModel",
    "checkpoint_dtype",
    "dtype_name",
    "load_model",
    "local_model_dir",
    "resolve_model_path",
]

# What a streamed run reads of a hub repository: config, weights, tokenizer, generation settings
# (never a pickled *.bin).
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16`` (one of :data:`DTYPES`)."""
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(path: str | Path, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype of a checkpoint's model by default (``--dtype auto``): its own, so a bf16
    model is computed in bf16 (half the memory of fp32; no worse perplexity on the bundled
    model, docs/benchmarks.md) and an fp32 one in fp32 (not rounded). config.json's ``dtype``
    (``torch_dtype`` in older files) when it names one of :data:`DTYPES`, else the dtype most of
    its float tensors are stored in (fp32 where that is none of them). An fp16 model computes in
    fp16 on a GPU and in fp32 on the CPU (exact, where bf16 would round it, and CPUs without
    native fp16 arithmetic run fp16 matmuls far slower)."""
    from quantlab.export.checkpoint_files import CheckpointFiles
    from quantlab.export.schema import read_config_json

    _, config = read_config_json(Path(path))
    own = None
    for key in ("dtype", "torch_dtype"):
        name = config.get(key)
        if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
            own = DTYPES[name.removeprefix("torch.")]
            break
    if own is None:
        with CheckpointFiles(path) as files:
            stored = files.dtype()
        own = stored if stored in DTYPES.values() else torch.float32
    if own == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return own


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: str
    quantized: bool


def resolve_model_path(spec: str) -> tuple[str, str]:
    """Return ``(path or hub id, display name)`` for a ``--model`` value."""
    if spec == "default":
        return str(default_model_dir()), DEFAULT_MODEL_NAME
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {spec}: expected a model directory, got a file")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: no config.json in that directory")
        return str(path), path.name
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"--model {spec}: no such directory")
    return spec, spec  # a hub id such as "meta-llama/Llama-3.1-8B"


def local_model_dir(spec: str) -> tuple[Path, str]:
    """``(local directory, display name)`` of a ``--model`` value: the bundled model's converted
    directory, a local directory, or a hub repository's snapshot (downloaded once into the
    Hugging Face cache; safetensors and JSON only)."""
    path, name = resolve_model_path(spec)
    if Path(path).is_dir():
        return Path(path), name
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=_HUB_FILES)), name
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types (network, auth)
        raise OSError(
            f"could not download model {spec!r} from the Hugging Face hub: {exc}"
        ) from exc


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    verify: bool = True,
    memory_budget: str | int | float | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer (quantlab checkpoints come back with QuantLinear layers,
    loaded strictly; ``verify``: also check their files against the recorded checksums;
    ``memory_budget``: a BitStack checkpoint's prefix, see :func:`quantlab.load`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.models.arch import linearize

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, name = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise OSError(f"could not load the tokenizer of {spec!r}: {exc}") from exc
    kind = checkpoint_kind(path)
    if kind in LOADABLE_KINDS:
        model = load_checkpoint(
            path, device=device, dtype=DTYPES[dtype], memory_budget=memory_budget, verify=verify
        )
        return LoadedModel(model, tokenizer, name, path, quantized=True)
    if kind == FP8_QUANT_METHOD:
        # Dequantized as the streamed pipeline reads it (transformers' own FP8 loading wants a
        # GPU), every tensor at once.
        from transformers import AutoConfig

        lazy = LazyModel(
            empty_model(AutoConfig.from_pretrained(path), DTYPES[dtype]),
            open_source_checkpoint(path),
            device,
        )
        model = lazy.load()
        return LoadedModel(model, tokenizer, name, path, quantized=False)
    try:
        # safetensors only: a pytorch_model.bin would be unpickled, which quantlab never does.
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True
        )
    except OSError as exc:
        raise OSError(f"could not load model {spec!r}: {exc}") from exc
    # Fused experts as one linear per expert projection (the same function): what quantlab's
    # methods, layers and exports work on.
    linearize(model)
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, name, path, quantized=False)
