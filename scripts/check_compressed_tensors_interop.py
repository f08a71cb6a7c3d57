"""Check quantlab's compressed-tensors checkpoints with the format's own code, and read
llm-compressor's with quantlab: every dequantized weight bit for bit, logits within float
tolerance.

compressed-tensors, llm-compressor and the transformers they pin live in their own environment
(``bash scripts/setup_interop_env.sh compressed-tensors``: torch 2.13.0 CPU, llmcompressor
0.14.0.1, which pins compressed-tensors 0.19.0 and transformers 5.17.0). Each step runs in the
environment named; files pass between them:

    # quantlab -> compressed-tensors (in quantlab's venv, then in the interop venv)
    python scripts/check_compressed_tensors_interop.py quantlab-dump CKPT /tmp/q.safetensors
    python scripts/check_compressed_tensors_interop.py ct-check      CKPT /tmp/q.safetensors

    # llm-compressor -> quantlab (quantlab, interop, interop, quantlab)
    python scripts/check_compressed_tensors_interop.py calib-ids /tmp/ids.safetensors
    python scripts/check_compressed_tensors_interop.py llmc-gptq MODEL /tmp/ids.safetensors OUT
    python scripts/check_compressed_tensors_interop.py ct-dump OUT /tmp/ct.safetensors
    python scripts/check_compressed_tensors_interop.py quantlab-check OUT /tmp/ct.safetensors

``ct-check`` reads the checkpoint twice with the format's code: compressed-tensors'
pack-quantized compressor decompressing every module's tensors under the scheme compressed-tensors
parses from config.json, and transformers' ``from_pretrained`` with
``CompressedTensorsConfig(run_compressed=False)`` (its CPU path), whose
Linear weights and logits are compared. Weights are compared in the dtype the checkpoint's scales
have (the format dequantizes in it), bit for bit; logits as a relative L2 difference and top-1
agreement on a fixed 64-token prompt. The exit status is 1 when a weight differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PROMPT = torch.arange(100, 164).unsqueeze(0)
_LOGITS = "__logits__"


def _files(ckpt: str) -> list[Path]:
    root = Path(ckpt)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [root / "model.safetensors"]


def _scale_dtype(ckpt: str) -> torch.dtype:
    """The dtype of the checkpoint's scales: the format dequantizes in it."""
    from safetensors import safe_open

    for file in _files(ckpt):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith(".weight_scale"):
                    return f.get_slice(key)[:1].dtype
    raise SystemExit(f"{ckpt}: no weight_scale tensor")


# ---- quantlab's side ----------------------------------------------------------------------


def quantlab_weights(ckpt: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    import quantlab
    from quantlab.nn import QuantLinear

    model = quantlab.load(ckpt)
    weights = {
        name: m.dequantized_weight(torch.float32).contiguous()
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    with torch.no_grad():
        logits = model(_PROMPT).logits.float().contiguous()
    return weights, logits


def quantlab_dump(ckpt: str, out: str) -> None:
    weights, logits = quantlab_weights(ckpt)
    save_file({**weights, _LOGITS: logits}, out)
    print(f"dumped quantlab's {len(weights)} dequantized weights and logits to {out}")


def calib_ids(out: str) -> None:
    """quantlab's GPTQ calibration windows of the bundled model (32 x 512 wiki-calib ids)."""
    from transformers import AutoTokenizer

    from quantlab.calib.data import calibration_samples
    from quantlab.export.default_model import default_model_dir
    from quantlab.methods.base import CalibConfig

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    calib = CalibConfig()
    ids = calibration_samples(
        tokenizer, calib.source, calib.n_samples, calib.seq_len, calib.seed
    ).contiguous()
    save_file({"ids": ids}, out)
    print(f"{tuple(ids.shape)} calibration ids of {default_model_dir()} -> {out}")


def quantlab_check(ckpt: str, ref_path: str) -> int:
    ref = load_file(ref_path)
    logits = ref.pop(_LOGITS)
    weights, ours = quantlab_weights(ckpt)
    dtype = _scale_dtype(ckpt)
    return _compare(weights, ref, dtype, ours, logits, "quantlab.load")


# ---- the format's side --------------------------------------------------------------------


def _transformers_model(ckpt: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        ckpt,
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    ).eval()


def _library_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as compressed-tensors' pack-quantized compressor
    decompresses it, with the scheme compressed-tensors parses from the checkpoint's config."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]
    fields = QuantizationConfig.model_fields
    config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in fields})
    schemes = list(config.config_groups.values())
    if len(schemes) != 1:
        raise SystemExit(f"{ckpt}: {len(schemes)} config groups; this check reads one")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file in _files(ckpt):
        for key, tensor in load_file(str(file)).items():
            module, _, suffix = key.rpartition(".")
            if suffix.startswith("weight_"):
                tensors.setdefault(module, {})[suffix] = tensor
    return {
        module: PackedQuantizationCompressor.decompress(state, schemes[0])["weight"]
        for module, state in tensors.items()
        if "weight_packed" in state
    }


def ct_dump(ckpt: str, out: str) -> None:
    model = _transformers_model(ckpt)
    with torch.no_grad():
        logits = model(_PROMPT).logits.float().contiguous()
    from torch import nn

    weights = {
        name: m.weight.detach().float().contiguous()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    save_file({**weights, _LOGITS: logits}, out)
    print(f"dumped transformers' decompressed {len(weights)} linears and logits to {out}")


def ct_check(ckpt: str, ref_path: str) -> int:
    import compressed_tensors
    import transformers

    ref = load_file(ref_path)
    logits = ref.pop(_LOGITS)
    dtype = _scale_dtype(ckpt)
    ct_version, tf_version = compressed_tensors.__version__, transformers.__version__
    print(f"compressed-tensors {ct_version}, transformers {tf_version}")
    status = 0
    reader = "compressed-tensors PackedQuantizationCompressor"
    status |= _compare(_library_weights(ckpt), ref, dtype, None, None, reader)
    model = _transformers_model(ckpt)
    from torch import nn

    weights = {
        name: m.weight.detach().float()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name in ref
    }
    with torch.no_grad():
        got = model(_PROMPT).logits.float()
    status |= _compare(weights, ref, dtype, got, logits, "transformers (CompressedTensorsConfig)")
    return status


def llmc_gptq(model_dir: str, ids_path: str, out: str) -> None:
    """llm-compressor's GPTQ W4 g64 asymmetric on ``model_dir`` with the given calibration ids,
    saved compressed (pack-quantized)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(ids_path)["ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    recipe = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 64,
                            "strategy": "group"},
            }
        },
    )  # fmt: skip
    oneshot(
        model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )  # fmt: skip
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(f"llm-compressor GPTQ W4 g64 asym -> {out}")


# ---- comparison ---------------------------------------------------------------------------


def _compare(
    weights: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    dtype: torch.dtype,
    got_logits: torch.Tensor | None,
    want_logits: torch.Tensor | None,
    reader: str,
) -> int:
    names = sorted(ref)
    missing = [n for n in names if n not in weights]
    mismatched = [
        n for n in names if n in weights and not torch.equal(weights[n].to(dtype), ref[n].to(dtype))
    ]
    same = len(names) - len(missing) - len(mismatched)
    print(f"{reader}: {same}/{len(names)} quantized weights identical in {dtype}")
    if missing:
        print(f"  missing: {missing[:5]}")
    if mismatched:
        first = mismatched[0]
        diff = (weights[first].float() - ref[first].float()).abs().max().item()
        print(f"  mismatched: {mismatched[:5]} (first max |diff| {diff:.3e})")
    if got_logits is not None and want_logits is not None:
        rel = float((got_logits - want_logits).norm() / want_logits.norm())
        top1 = float((got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean())
        print(f"  logits on the {_PROMPT.shape[1]}-token prompt: relative L2 difference "
              f"{rel:.2e}, top-1 agreement {top1:.3f}")  # fmt: skip
    return 1 if (missing or mismatched) else 0


_COMMANDS = {
    "quantlab-dump": (quantlab_dump, 2),
    "ct-check": (ct_check, 2),
    "calib-ids": (calib_ids, 1),
    "llmc-gptq": (llmc_gptq, 3),
    "ct-dump": (ct_dump, 2),
    "quantlab-check": (quantlab_check, 2),
}

if __name__ == "__main__":
    command = _COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if command is None or len(sys.argv) != 2 + command[1]:
        print(__doc__)
        sys.exit(2)
    result = command[0](*sys.argv[2:])
    sys.exit(result if isinstance(result, int) else 0)
