"""GPTQModel GPTQ W4 g64 asymmetric, scored with the shared ppl.py (run in .venv-peers/gptqmodel).

``GPTQModel.load(model_dir, QuantizeConfig(bits=4, group_size=64, sym=False))``, ``quantize`` on
the shared ``calib_ids.npy`` windows (32 x 512), ``save`` (a real packed GPTQ checkpoint), then
score it in fp32 (see ``_dequantized_fp32``). GPTQModel needs the CUDA build of torch (2.14.1)
even on CPU, and ``GPTQMODEL_CPU_WORKERS=2`` on a 2-core machine (its default asks for more
workers than exist).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 2, 2)))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import emit, load_ids, perplexity_windows  # noqa: E402


def _dequantized_fp32(ckpt: str, model_dir: str) -> tuple[torch.nn.Module, list[str]]:
    """The fp32 model with every quantized linear replaced by its GPTQ weights dequantized in fp32.

    GPTQModel 7.7.0's default CPU kernel for an fp32 model (``TorchFusedLinear``) returns garbage
    (ppl ~1.5e8 on this model), and its correct kernels (``TorchLinear``,
    ``TorchCpuAvx512Linear``) run only in fp16/bf16. So the saved checkpoint is loaded with the
    reference ``TorchLinear`` (fp16: the checkpoint's scales are fp16, so nothing is lost), each
    layer's weight is dequantized with fp32 scales by GPTQModel's own ``dequantize_weight``, and
    written into the fp32 model loaded from ``model_dir``: the eval then runs in fp32 like every
    other row.
    """
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from transformers import AutoModelForCausalLM

    qmodel = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    kernels = sorted(
        {type(m).__name__ for m in qmodel.model.modules() if "Linear" in type(m).__name__}
    )
    weights = {}
    with torch.no_grad():
        for name, mod in qmodel.model.named_modules():
            if isinstance(mod, TorchLinear):
                mod.scales = mod.scales.float()
                weights[name] = mod.dequantize_weight().T.float().contiguous()
    del qmodel
    if not weights:
        raise RuntimeError(f"no TorchLinear layers in {ckpt}")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True
    )
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            if name not in mods or mods[name].weight.shape != w.shape:
                raise RuntimeError(f"{name}: no matching fp32 linear for the GPTQ layer {w.shape}")
            mods[name].weight.copy_(w)
    return model.eval(), kernels + [f"{len(weights)} layers dequantized to fp32"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True, help="folder with calib_ids.npy, eval_windows.npy")
    p.add_argument("--out", required=True, help="where the GPTQ checkpoint is written")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--eval-only", action="store_true", help="score the checkpoint already at --out")
    args = p.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    torch.manual_seed(0)
    data = Path(args.data_dir)
    calib = load_ids(data / "calib_ids.npy")
    windows = load_ids(data / "eval_windows.npy")
    samples = [
        {"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)}
        for row in calib
    ]
    qcfg = QuantizeConfig(bits=4, group_size=args.group, sym=False)
    out = Path(args.out)
    seconds = None
    if not args.eval_only:
        model = GPTQModel.load(args.model_dir, qcfg, device="cpu", dtype=torch.float32)
        t0 = time.perf_counter()
        model.quantize(samples, batch_size=1)
        seconds = round(time.perf_counter() - t0, 2)
        if out.exists():
            shutil.rmtree(out)
        model.save(str(out))
        del model
    model, kernels = _dequantized_fp32(str(out), args.model_dir)
    result = perplexity_windows(model, windows)
    emit(
        {
            "tool": "GPTQModel",
            "version": md.version("gptqmodel"),
            "torch": torch.__version__,
            "transformers": md.version("transformers"),
            "method": "gptq",
            "bits": 4,
            "group": args.group,
            "sym": False,
            "calib": list(calib.shape),
            "kernels": kernels,
            "quantize_seconds": seconds,
            "eval": "checkpoint dequantized to fp32 (GPTQModel dequantize_weight)",
            **result,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
