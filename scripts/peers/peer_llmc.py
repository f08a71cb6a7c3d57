"""llm-compressor GPTQ (and AWQ) W4 g64 asymmetric, scored with ppl.py (run in .venv-peers/llmc).

``oneshot(model, dataset, recipe)`` with ``GPTQModifier`` (or ``AWQModifier``) and one
``QuantizationScheme`` (int4, asymmetric, group strategy, group 64) on every Linear except
lm_head; the tool's other defaults are kept (GPTQ ``actorder="static"``, damping 0.01; AWQ duo
scaling). Calibration is the shared ``calib_ids.npy`` (32 x 512 token ids, the same windows
quantlab's GPTQ/AWQ draw), passed as a tokenized dataset. The in-memory model is then scored.

AWQ on a CPU-only torch fails in ``IntermediatesCache`` pinning memory ("Cannot access
accelerator device"); as in environment.md, ``IntermediatesCache._pin_intermediate`` is patched
to a no-op for the run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import emit, load_ids, perplexity_windows  # noqa: E402


def _patch_pin_memory() -> None:
    """CPU-only torch: pinning raises "Cannot access accelerator device"; make it a no-op."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True, help="folder with calib_ids.npy, eval_windows.npy")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    args = p.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    data = Path(args.data_dir)
    calib = load_ids(data / "calib_ids.npy")
    windows = load_ids(data / "eval_windows.npy")
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="group", group_size=args.group
        ),
    )
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        _patch_pin_memory()
        recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])

    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, use_safetensors=True
    ).eval()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=args.model_dir,
        dataset=ds,
        recipe=recipe,
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
    )
    seconds = time.perf_counter() - t0
    result = perplexity_windows(model, windows)
    emit(
        {
            "tool": "llm-compressor",
            "version": md.version("llmcompressor"),
            "torch": torch.__version__,
            "transformers": md.version("transformers"),
            "compressed_tensors": md.version("compressed-tensors"),
            "method": args.method,
            "bits": 4,
            "group": args.group,
            "sym": False,
            "calib": list(calib.shape),
            "quantize_seconds": round(seconds, 2),
            **result,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
