"""Small checkpoints written by quantlab, and the ways to damage them that the hostile-input
corpus (tests/export/test_hostile_checkpoints.py) and the fuzz test use."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import quantlab
from quantlab.export.checksums import CHECKSUMS_NAME

WEIGHTS = "model.safetensors"


def make_tiny_llama(tie: bool = True, seed: int = 0) -> nn.Module:
    """A randomly initialised 2-block Llama (hidden 128, MLP 256, vocab 512; the ``tiny_llama``
    fixture of tests/conftest.py), its head tied to the embedding unless ``tie`` is False."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def quantize_tiny(kind: str) -> tuple[nn.Module, Any]:
    """The quantized tiny Llama (and its report) that :func:`write_checkpoint` saves for
    ``kind``; deterministic, so a test can rebuild the model a checkpoint was written from."""
    model = make_tiny_llama(tie=kind != "untied")
    if kind == "bitstack":
        from quantlab.methods.bitstack.config import BitStackConfig
        from quantlab.pipeline import quantize_model

        samples = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        config = BitStackConfig(n_blocks=3, rank=2)
        report = quantize_model(model, config, samples=samples, progress=False)
    elif kind == "ternary":
        report = quantlab.quantize(model, "ternary", progress=False, solver="absmean")
    else:
        sym = kind in ("rtn-sym", "gptq")
        report = quantlab.quantize(model, "rtn", bits=4, group_size=32, sym=sym, progress=False)
    return model, report


def write_checkpoint(kind: str, out: Path) -> Path:
    """A small checkpoint of ``kind``: ``rtn`` (groupwise W4 g32, asymmetric, tied head),
    ``rtn-sym``, ``untied`` (W4 g32, separate head), ``bitstack`` (3 blocks, rank 2), ``gptq``
    and ``awq`` (the foreign layouts), ``ternary``."""
    from quantlab.export.awq_checkpoint import save_awq
    from quantlab.export.gptq_checkpoint import save_gptq

    model, report = quantize_tiny(kind)
    if kind == "gptq":
        return save_gptq(model, out, report.config)[0]
    if kind == "awq":
        return save_awq(model, out, report.config)
    return quantlab.save(model, str(out), report)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(header JSON, data section)`` of a safetensors file, without any check."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change the safetensors header in place, keeping the data bytes."""
    header, data = read_raw(root / WEIGHTS)
    edit(header)
    write_raw(root / WEIGHTS, header, data)


def edit_state(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load every tensor, change them, write the file again (a well-formed file)."""
    state = load_file(root / WEIGHTS)
    edit(state)
    save_file(state, str(root / WEIGHTS), metadata={"format": "pt"})


def edit_config(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((root / "config.json").read_text())
    edit(config)
    (root / "config.json").write_text(json.dumps(config))


def drop_checksums(root: Path) -> None:
    """Remove the checksum manifest, as in a checkpoint of an older quantlab: the structural and
    value checks must then catch the damage on their own."""
    (root / CHECKSUMS_NAME).unlink(missing_ok=True)


def first_module(root: Path, suffix: str = "qweight") -> str:
    """The name of the first quantized module (by sorted key) that stores ``suffix``."""
    header, _ = read_raw(root / WEIGHTS)
    return sorted(k for k in header if k.endswith(f".{suffix}"))[0].rsplit(".", 1)[0]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_model(a: nn.Module, b: nn.Module) -> bool:
    """Every tensor equal (bit for bit, dtype included) and the same architecture config."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    if any(sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    keep = ("quantization_config", "_name_or_path", "transformers_version")
    ca = {k: v for k, v in a.config.to_dict().items() if k not in keep}
    cb = {k: v for k, v in b.config.to_dict().items() if k not in keep}
    return ca == cb
