"""Turn a dense Llama-family checkpoint into a mixture of experts that computes the same function.

No mixture-of-experts checkpoint is available offline, so quantlab's MoE quality figures use one
built from the bundled SmolLM2-135M: each MLP's ``I`` intermediate neurons are split into ``E``
experts of ``I / E`` (the gate and up rows, the down columns), the router's weight is zero and it
picks the top ``E`` of ``E``. Every token then goes to every expert with routing weight ``1 / E``
(softmax of zeros, renormalised over the top-k), so the down projections are scaled by ``E``:
``sum_e (1/E) * E * down_e(act(gate_e x) * up_e x) = down(act(gate x) * up x)``. With ``E`` a
power of two the scaling is exact in floating point; only the order of the sum over the
intermediate neurons changes.

The result is written in the Mixtral layout (``block_sparse_moe.experts.E.w1/w3/w2``, router
``block_sparse_moe.gate``), which transformers and vLLM load. Mixtral is the one MoE layout that
holds a Llama block exactly: Qwen3-MoE normalises q and k per head (an RMSNorm that cannot be the
identity), Qwen2-MoE adds a shared expert and q/k/v biases.

    python scripts/moefy.py --model default --experts 8 --out out/moefied-smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def moefy_state(
    dense: dict[str, torch.Tensor], n_layers: int, experts: int
) -> dict[str, torch.Tensor]:
    """The Mixtral state dict of ``dense`` (a Llama state dict): every MLP split into
    ``experts`` experts, a zero router per layer, everything else unchanged."""
    out = {k: v for k, v in dense.items() if ".mlp." not in k}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}"
        gate = dense[f"{prefix}.mlp.gate_proj.weight"]
        up = dense[f"{prefix}.mlp.up_proj.weight"]
        down = dense[f"{prefix}.mlp.down_proj.weight"]
        intermediate, hidden = gate.shape
        if intermediate % experts:
            raise ValueError(
                f"{prefix}: {intermediate} intermediate neurons do not split into {experts} experts"
            )
        width = intermediate // experts
        moe = f"{prefix}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = torch.zeros(experts, hidden, dtype=gate.dtype)
        for e in range(experts):
            rows = slice(e * width, (e + 1) * width)
            out[f"{moe}.experts.{e}.w1.weight"] = gate[rows].clone()
            out[f"{moe}.experts.{e}.w3.weight"] = up[rows].clone()
            out[f"{moe}.experts.{e}.w2.weight"] = (down[:, rows] * experts).contiguous()
    return out


def mixtral_config(dense: dict, experts: int) -> dict:
    """The Mixtral ``config.json`` of a Llama ``config.json`` split into ``experts`` experts."""
    if dense.get("model_type") != "llama":
        raise ValueError(f"expected a llama checkpoint, got model_type {dense.get('model_type')!r}")
    for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
        if dense.get(key) == unsupported:
            raise ValueError(f"{key}={unsupported}: Mixtral blocks have no biases")
    if dense.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {dense.get('hidden_act')!r}: Mixtral experts use silu")
    keep = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "unk_token_id", "initializer_range", "dtype", "torch_dtype",
    )  # fmt: skip
    config = {k: dense[k] for k in keep if k in dense}
    config.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        hidden_act="silu",
        intermediate_size=dense["intermediate_size"] // experts,
        num_local_experts=experts,
        num_experts_per_tok=experts,
        router_jitter_noise=0.0,
        sliding_window=None,
        output_router_logits=False,
    )
    return config


def moefy(source: Path, out: Path, experts: int) -> Path:
    """Write the MoE version of the dense checkpoint ``source`` to ``out`` (safetensors, config,
    tokenizer files copied); returns ``out``."""
    import shutil

    from safetensors.torch import load_file, save_file

    dense_config = json.loads((source / "config.json").read_text())
    config = mixtral_config(dense_config, experts)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    moe = moefy_state(state, dense_config["num_hidden_layers"], experts)
    if config.get("tie_word_embeddings"):
        moe.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(moe, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in source.iterdir():
        copied = name.suffix in (".json", ".model", ".txt", ".tiktoken", ".jinja")
        # (quantlab_source.json marks quantlab's own conversion cache, not this model.)
        skipped = name.name in (
            "config.json",
            "quantlab_source.json",
            "model.safetensors.index.json",
        )
        if copied and not skipped:
            shutil.copy(name, out / name.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a dense llama checkpoint directory")
    parser.add_argument("--experts", type=int, default=8, help="a power of two")
    parser.add_argument("--out", type=Path, default=Path("out/moefied-smollm2"))
    args = parser.parse_args(argv)
    if args.experts < 1 or args.experts & (args.experts - 1):
        parser.error("--experts must be a power of two (so the 1/E routing weight is exact)")
    from quantlab.export.model_source import local_model_dir

    source, _ = local_model_dir(args.model)
    print(moefy(source, args.out, args.experts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
