"""Check that GPTQModel reads a quantlab GPTQ-layout export to the same weights quantlab does.

Run it twice, because GPTQModel needs its own environment (it requires the CUDA build of torch
2.14.1 and runs on the CPU with its TorchLinear kernel):

    # 1. in quantlab's venv: dump quantlab's dequantized weights of the checkpoint
    python scripts/check_gptqmodel_interop.py dump  CKPT_DIR /tmp/quantlab_weights.safetensors
    # 2. in a venv with `pip install torch==2.14.1 gptqmodel`: compare with GPTQModel's
    python scripts/check_gptqmodel_interop.py check CKPT_DIR /tmp/quantlab_weights.safetensors

GPTQModel dequantizes to fp16, so the check is that quantlab's fp32 weight rounded to fp16 equals
GPTQModel's exactly, for every quantized linear.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def dump(ckpt: str, out: str) -> None:
    import quantlab
    from quantlab.nn import QuantLinear

    model = quantlab.load(ckpt)
    weights = {
        name: m.dequantized_weight(torch.float32).contiguous()
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    save_file(weights, out)
    print(f"dumped {len(weights)} dequantized weights to {out}")


def check(ckpt: str, ref_path: str) -> int:
    from gptqmodel import BACKEND, GPTQModel

    ref = load_file(ref_path)
    model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    mismatched = []
    for name, expected in ref.items():
        # GPTQModel returns the weight as [in_features, out_features].
        got = model.model.get_submodule(name).dequantize_weight().float().t()
        if not torch.equal(got, expected.half().float()):
            mismatched.append(name)
    print(f"{len(ref) - len(mismatched)}/{len(ref)} layers identical (fp16) in GPTQModel")
    if mismatched:
        print("mismatched:", mismatched[:10])
    return 1 if mismatched else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("dump", "check"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
