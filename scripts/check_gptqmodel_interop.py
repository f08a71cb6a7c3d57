"""Check that GPTQModel and transformers read quantlab's GPTQ- and AWQ-layout exports to the same
weights quantlab does.

Run it twice, because GPTQModel needs its own environment (it requires the CUDA build of torch
2.14.1 and runs on the CPU with its torch kernels):

    # 1. in quantlab's venv: dump quantlab's dequantized weights of the checkpoint
    python scripts/check_gptqmodel_interop.py dump  CKPT_DIR /tmp/quantlab_weights.safetensors
    # 2. in a venv with `pip install torch==2.14.1 gptqmodel`: compare with GPTQModel's
    python scripts/check_gptqmodel_interop.py check CKPT_DIR /tmp/quantlab_weights.safetensors

GPTQ layout: the checkpoint is loaded with ``GPTQModel.load`` (TorchLinear backend). AWQ layout:
it is loaded the way users load AWQ checkpoints, ``transformers.AutoModelForCausalLM
.from_pretrained`` (transformers hands AWQ to GPTQModel's kernels; on the CPU that is
``TorchAtenAwqLinear``). Both dequantize to fp16, so the check is that quantlab's fp32 weight
rounded to fp16 equals theirs exactly, for every quantized linear. For AWQ the script also runs the
transformers model (fp16, the int4pack CPU kernel) on a fixed prompt and prints how far its logits
are from quantlab's (dumped with the weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# A fixed prompt of token ids (no tokenizer needed on either side) and the key its logits use.
_PROMPT = torch.arange(100, 164).unsqueeze(0)
_LOGITS = "__logits__"


def dump(ckpt: str, out: str) -> None:
    import quantlab
    from quantlab.nn import QuantLinear

    model = quantlab.load(ckpt)
    weights = {
        name: m.dequantized_weight(torch.float32).contiguous()
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    with torch.no_grad():
        weights[_LOGITS] = model(_PROMPT).logits.float().contiguous()
    save_file(weights, out)
    print(f"dumped {len(weights)} dequantized weights to {out}")


def _checkpoint_kind(ckpt: str) -> str:
    config = json.loads((Path(ckpt) / "config.json").read_text())
    return config["quantization_config"]["quant_method"]


def check(ckpt: str, ref_path: str) -> int:
    ref = load_file(ref_path)
    logits = ref.pop(_LOGITS)
    kind = _checkpoint_kind(ckpt)
    if kind == "awq":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16, device_map="cpu")

        def weight(name: str) -> torch.Tensor:
            # Before the first forward the layer still holds the AWQ tensors; [in, out].
            return model.get_submodule(name).awq_weight_dequantize("cpu", torch.float16)

        reader = "transformers + GPTQModel (AWQ GEMM)"
    elif kind == "gptq":
        from gptqmodel import BACKEND, GPTQModel

        model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)

        def weight(name: str) -> torch.Tensor:
            return model.model.get_submodule(name).dequantize_weight()  # [in, out]

        reader = "GPTQModel (GPTQ)"
    else:
        print(f"{ckpt}: quant_method {kind!r} is neither gptq nor awq")
        return 2
    mismatched = [
        name
        for name, expected in ref.items()
        if not torch.equal(weight(name).float().t(), expected.half().float())
    ]
    print(f"{len(ref) - len(mismatched)}/{len(ref)} layers identical (fp16) in {reader}")
    if mismatched:
        print("mismatched:", mismatched[:10])
    if kind == "awq":
        with torch.no_grad():
            got = model(_PROMPT).logits.float()
        rel = float((got - logits).norm() / logits.norm())
        top1 = float((got.argmax(-1) == logits.argmax(-1)).float().mean())
        print(
            f"logits of the {_PROMPT.shape[1]}-token prompt (transformers fp16 vs quantlab fp32): "
            f"relative L2 difference {rel:.2e}, top-1 agreement {top1:.3f}"
        )
    return 1 if mismatched else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("dump", "check"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
