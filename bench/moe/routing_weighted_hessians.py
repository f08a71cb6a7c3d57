"""Does weighting each token by its routing weight in a routed expert's Hessian (MoEQuant's
affinity-guided Hessian, ``--routing-weighted-hessians``) help GPTQ?

    python bench/moe/routing_weighted_hessians.py --markdown
    python bench/moe/routing_weighted_hessians.py --float-only --variants 8:0.25 6:0.25 4:0.25

The exact MoEfied model routes every token to every expert with weight 1/8, where the weighting
changes nothing, so this uses *routed* MoEfied models (scripts/moefy.py ``--top-k K --fit-router
--router-scale S``: each router fit to the experts' output norms and scaled by S, top K of 8,
routing weights that vary by token; top-8 keeps every expert for every token, top-6 drops two). Each
is quantized with GPTQ (W4 g64 by default; act-order, clip search) with plain and with routing-
weighted Hessians on the same calibration windows, and evaluated on the same wiki-eval windows; the
table gives the mixture's float perplexity and both quantized ones.

Prints one JSON object per run, and with ``--markdown`` the rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def float_figures(model_dir: Path) -> dict[str, object]:
    """A routed model in float: its perplexity on the usual 10 x 2048 wiki-eval windows and the
    spread of its routing weights (times the expert count, so 1 is uniform) on the first 512
    of those tokens: the 5th, 25th, 50th, 75th and 95th percentiles."""
    import torch

    from quantlab.calib.data import load_text, token_stream
    from quantlab.eval.perplexity import perplexity
    from quantlab.export.model_source import load_model

    loaded = load_model(str(model_dir))
    model = loaded.model.eval()
    tokens = token_stream(loaded.tokenizer, load_text("wiki-eval"))
    weights: list[torch.Tensor] = []
    hooks = [
        layer.block_sparse_moe.gate.register_forward_hook(
            lambda _m, _args, out: weights.append(out[1].detach().flatten())
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(tokens[:512].unsqueeze(0))
    for hook in hooks:
        hook.remove()
    spread = torch.cat(weights) * model.config.num_local_experts
    ppl = perplexity(model, tokens, seq_len=2048, max_windows=10, progress=False).ppl
    return {
        "ppl_float": ppl,
        "routing_weight_x_experts_percentiles": [
            round(float(spread.quantile(q)), 4) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    from bench.moe.moefied_quality import quantize_with_cli
    from quantlab.export.model_source import local_model_dir
    from scripts.moefy import moefy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["8:0.25", "6:0.25"],
        help="routed models as TOP_K:ROUTER_SCALE (scripts/moefy.py --top-k, --router-scale)",
    )
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--method", default="gptq", help="a Hessian-based method")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "moefied-routed")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--float-only",
        action="store_true",
        help="only each routed model's float perplexity and routing-weight spread",
    )
    parser.add_argument("extra", nargs="*", help="more `quantlab quantize` options (after --)")
    args = parser.parse_args(argv)

    dense_dir, _ = local_model_dir("default")
    rows = []
    for variant in args.variants:
        top_k, scale = int(variant.split(":")[0]), float(variant.split(":")[1])
        name = f"top{top_k}-scale{scale:g}"
        model = args.work / name
        if not (model / "config.json").is_file():
            moefy(dense_dir, model, args.experts, top_k, fit_router=True, router_scale=scale)
        if args.float_only:
            print(json.dumps({"top_k": top_k, "router_scale": scale, **float_figures(model)}))
            continue
        runs = {}
        for weighted in (False, True):
            tag = "weighted" if weighted else "plain"
            out = args.work / f"{name}-{args.method}-w{args.bits}g{args.group_size}-{tag}"
            extra = [*args.extra, *(["--routing-weighted-hessians"] if weighted else [])]
            result = quantize_with_cli(model, args.method, args.bits, args.group_size, out, extra)
            result["top_k"], result["router_scale"] = top_k, scale
            result["routing_weighted"] = weighted
            print(json.dumps({k: v for k, v in result.items() if k != "layers"}), flush=True)
            runs[tag] = result
        row = {
            "top_k": top_k,
            "router_scale": scale,
            "method": args.method,
            "bits": args.bits,
            "group_size": args.group_size,
            "ppl_float": runs["plain"]["ppl_baseline"],
            "ppl_plain": runs["plain"]["ppl"],
            "ppl_weighted": runs["weighted"]["ppl"],
            "seconds_plain": runs["plain"]["quantize_seconds"],
            "seconds_weighted": runs["weighted"]["quantize_seconds"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        print(
            "| routed MoEfied model | float ppl | plain Hessians | routing-weighted | "
            "weighted vs plain (of the gap to float) |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            gap_plain = r["ppl_plain"] - r["ppl_float"]
            gap_weighted = r["ppl_weighted"] - r["ppl_float"]
            print(
                f"| top-{r['top_k']} of {args.experts}, router x{r['router_scale']:g}, "
                f"{r['method']} W{r['bits']} "
                f"g{r['group_size']} | {r['ppl_float']:.4f} | {r['ppl_plain']:.4f} | "
                f"{r['ppl_weighted']:.4f} | {100 * (gap_weighted / gap_plain - 1):+.1f} % |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
