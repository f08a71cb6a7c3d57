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

``--top-k K --fit-router`` makes a *routed* mixture instead, whose routing weights vary from token
to token (what routing-weighted Hessians need to show an effect; the exact one routes 1/E
everywhere): each layer's router is fit by least squares, on the dense model's MLP inputs over
calibration text, to predict the log of each expert's output norm (centred per token), and picks the
top K; the down projections are scaled by K (uniform weights 1/K would give each chosen expert its
dense share). It no longer computes the dense function -- the other ``E - K`` experts' share is
dropped and the chosen ones are weighted by the router -- so it is compared with itself in float,
not with the dense model. SmolLM2's MLPs do not survive losing experts (float perplexity on 10 x
2048 wiki-eval tokens, routers scaled by 0.25: top-4 of 8 5406, top-6 96.15), so the useful variant
keeps all 8: ``--top-k 8 --fit-router --router-scale 0.25`` gives 24.17 (dense 19.74), every token
reaching every expert with routing weights that vary by token
(bench/moe/routing_weighted_hessians.py --float-only).

    python scripts/moefy.py --top-k 8 --fit-router --router-scale 0.25 --out out/moefied-routed
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
    dense: dict[str, torch.Tensor],
    n_layers: int,
    experts: int,
    top_k: int | None = None,
    routers: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The Mixtral state dict of ``dense`` (a Llama state dict): every MLP split into
    ``experts`` experts, the down projections scaled by ``top_k`` (default: ``experts``), a
    router per layer (``routers[layer]`` ``[experts, hidden]``, default zero), everything else
    unchanged."""
    top_k = experts if top_k is None else top_k
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
        router = torch.zeros(experts, hidden) if routers is None else routers[layer]
        out[f"{moe}.gate.weight"] = router.to(gate.dtype).contiguous()
        for e in range(experts):
            rows = slice(e * width, (e + 1) * width)
            out[f"{moe}.experts.{e}.w1.weight"] = gate[rows].clone()
            out[f"{moe}.experts.{e}.w3.weight"] = up[rows].clone()
            out[f"{moe}.experts.{e}.w2.weight"] = (down[:, rows] * top_k).contiguous()
    return out


def expert_output_norms(mlp: torch.nn.Module, x: torch.Tensor, experts: int) -> torch.Tensor:
    """``[tokens, experts]``: the norm of each expert's share of the dense MLP's output (its
    ``I / experts`` neurons through their down columns) for every row of ``x``."""
    inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    width = inner.shape[1] // experts
    down = mlp.down_proj.weight
    return torch.stack(
        [
            (inner[:, e * width : (e + 1) * width] @ down[:, e * width : (e + 1) * width].t()).norm(
                dim=1
            )
            for e in range(experts)
        ],
        dim=1,
    )


def fit_routers(
    source: Path, experts: int, windows: int = 16, seq_len: int = 512, ridge: float = 0.1
) -> list[torch.Tensor]:
    """One router ``[experts, hidden]`` per layer of the dense checkpoint ``source``: the least
    squares fit (ridge ``ridge`` times the mean diagonal; weaker ridges fit the calibration tokens
    and generalise worse) of ``log ||expert_e(x)||``, centred over the experts per token, from the
    MLP input ``x``, over ``windows x seq_len`` tokens of wiki-calib. A weak router: a linear map
    tells little about which of a split dense MLP's neurons a token needs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.calib.data import load_text, token_stream

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = token_stream(tokenizer, load_text("wiki-calib"))[: windows * seq_len]
    if ids.numel() < windows * seq_len:
        raise ValueError(f"wiki-calib holds {ids.numel()} tokens, fewer than {windows}x{seq_len}")
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        for window in ids.view(windows, seq_len).split(4):
            model(window)
    for hook in hooks:
        hook.remove()
    n_layers = len(model.model.layers)
    routers = []
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            x = torch.cat(inputs[index::n_layers])
            norms = expert_output_norms(layer.mlp, x, experts).double()
            target = norms.clamp_min(1e-12).log()
            target -= target.mean(dim=1, keepdim=True)
            x = x.double()
            gram = x.t() @ x
            gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
            routers.append(torch.linalg.solve(gram, x.t() @ target).t().float())
    return routers


def mixtral_config(dense: dict, experts: int, top_k: int | None = None) -> dict:
    """The Mixtral ``config.json`` of a Llama ``config.json`` split into ``experts`` experts, each
    token routed to ``top_k`` of them (default: all)."""
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
        num_experts_per_tok=experts if top_k is None else top_k,
        router_jitter_noise=0.0,
        sliding_window=None,
        output_router_logits=False,
    )
    return config


def moefy(
    source: Path,
    out: Path,
    experts: int,
    top_k: int | None = None,
    fit_router: bool = False,
    router_scale: float = 1.0,
) -> Path:
    """Write the MoE version of the dense checkpoint ``source`` to ``out`` (safetensors, config,
    tokenizer files copied); returns ``out``. ``top_k`` below ``experts`` needs ``fit_router``
    (a zero router would pick the same experts for every token); ``router_scale`` multiplies
    the fitted routers (below 1: routing weights closer to uniform, the same choice)."""
    import shutil

    from safetensors.torch import load_file, save_file

    top_k = experts if top_k is None else top_k
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in 1..{experts}, got {top_k}")
    if top_k < experts and not fit_router:
        raise ValueError(f"top-{top_k} of {experts} with a zero router routes every token alike")
    if router_scale != 1.0 and not fit_router:
        raise ValueError("router_scale scales a fitted router: give fit_router too")
    dense_config = json.loads((source / "config.json").read_text())
    config = mixtral_config(dense_config, experts, top_k)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    routers = [r * router_scale for r in fit_routers(source, experts)] if fit_router else None
    moe = moefy_state(state, dense_config["num_hidden_layers"], experts, top_k, routers)
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
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="experts per token (default: all; needs --fit-router)",
    )
    parser.add_argument(
        "--fit-router",
        action="store_true",
        help="fit each router to the experts' output norms on wiki-calib (a routed mixture)",
    )
    parser.add_argument(
        "--router-scale",
        type=float,
        default=1.0,
        help="multiply the fitted routers (below 1: weights nearer uniform, the same choice)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/moefied-smollm2"))
    args = parser.parse_args(argv)
    if args.experts < 1 or args.experts & (args.experts - 1):
        parser.error("--experts must be a power of two (so the 1/E routing weight is exact)")
    from quantlab.export.model_source import local_model_dir

    source, _ = local_model_dir(args.model)
    try:
        print(moefy(source, args.out, args.experts, args.top_k, args.fit_router, args.router_scale))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
