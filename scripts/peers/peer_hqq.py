"""HQQ and torchao W4 g64 on the bundled model, scored with ppl.py (run in .venv-peers/hqq).

Methods (``--methods``, comma separated):

* ``hqq``: ``AutoHQQHFModel.quantize_model(m, BaseQuantizeConfig(nbits=4, group_size=g),
  compute_dtype=torch.float32, device="cpu")``; asymmetric (float zero point), no calibration.
* ``torchao-sym``: ``quantize_(m, IntxWeightOnlyConfig(torch.int4, PerGroup(g)))``: torchao's
  default mapping, which is SYMMETRIC (this is the torchao 27.29 row of environment.md).
* ``torchao-asym``: the same with ``mapping_type=MappingType.ASYMMETRIC``.

Only the decoder linears are quantized (lm_head, tied to the embeddings, stays fp32), as in
quantlab and the other peers. Prints one ``PEER_RESULT {json}`` line per method.
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


def _load(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True
    ).eval()


def _hqq(model: torch.nn.Module, group: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    cfg = BaseQuantizeConfig(nbits=4, group_size=group)
    AutoHQQHFModel.quantize_model(
        model, quant_config=cfg, compute_dtype=torch.float32, device="cpu"
    )


def _torchao(model: torch.nn.Module, group: int, asym: bool) -> None:
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup

    kwargs = {"mapping_type": MappingType.ASYMMETRIC} if asym else {}
    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group), **kwargs)
    quantize_(
        model,
        cfg,
        filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and "lm_head" not in name,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True, help="folder with eval_windows.npy")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--methods", default="hqq,torchao-sym,torchao-asym")
    args = p.parse_args()
    torch.manual_seed(0)
    windows = load_ids(Path(args.data_dir) / "eval_windows.npy")
    for method in [m for m in args.methods.split(",") if m]:
        model = _load(args.model_dir)
        t0 = time.perf_counter()
        if method == "hqq":
            _hqq(model, args.group)
            tool, version, sym = "hqq", md.version("hqq"), False
        elif method in ("torchao-sym", "torchao-asym"):
            _torchao(model, args.group, asym=method.endswith("asym"))
            tool, version, sym = "torchao", md.version("torchao"), method == "torchao-sym"
        else:
            raise SystemExit(f"unknown method {method!r}")
        seconds = time.perf_counter() - t0
        result = perplexity_windows(model, windows)
        emit(
            {
                "tool": tool,
                "version": version,
                "torch": torch.__version__,
                "method": method,
                "bits": 4,
                "group": args.group,
                "sym": sym,
                "quantize_seconds": round(seconds, 2),
                **result,
            }
        )
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
