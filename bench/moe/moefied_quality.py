"""A mixture of experts with real weights against the dense model it was made from, quantized the
same ways: what per-expert calibration costs in quality.

    python bench/moe/moefied_quality.py --markdown

The mixture is the bundled SmolLM2-135M split into 8 experts per MLP (scripts/moefy.py: a zero
router, top-8 of 8, down projections scaled by 8), which computes the dense model's function.
Each method (RTN, GPTQ, AWQ; W4 g64 by default) quantizes both through ``quantlab quantize``
(streamed, evaluated on the same wiki windows), and the table compares their perplexities.

What to expect, and what the script checks:

* float: the same perplexity (the same function up to the order of a sum);
* RTN: the same quantized weights where the groups align (an expert's gate/up rows are the dense
  rows; its down columns are 3 whole groups of 64 of the dense row, times 8, and a power-of-two
  factor leaves the codes and zero points alone and scales the fp16 scales exactly); the script
  compares every dequantized expert weight with the dense one's slice;
* GPTQ: every expert sees every token, so gate/up have the dense Hessian (rows are independent
  given it); each expert's down projection has only its own 192 x 192 diagonal block of the dense
  down Hessian, so error feedback stops at expert boundaries;
* AWQ: one scale search for the norm in front of all experts on the whole layer's output (as the
  dense gate/up map), but one up -> down search per expert instead of one per MLP.

Prints one JSON object per run, and with ``--markdown`` the rows for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def quantize_with_cli(
    model: Path | str, method: str, bits: int, group: int, out: Path, extra: list[str]
) -> dict:
    """`quantlab quantize ... --json` in a subprocess; its JSON result plus `wall_seconds`."""
    command = [
        sys.executable, "-m", "quantlab", "quantize", "--model", str(model), "--method", method,
        "--bits", str(bits), "--group-size", str(group), "--out", str(out), "--overwrite",
        "--json", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _rtn_weights_agree(dense_out: Path, moe_out: Path, experts: int) -> dict[str, float]:
    """Every dequantized expert weight against the dense checkpoint's slice (the expert's down
    divided by ``experts``): the largest absolute difference per projection."""
    import quantlab

    dense = quantlab.load(str(dense_out))
    moe = quantlab.load(str(moe_out))
    worst = {"gate": 0.0, "up": 0.0, "down": 0.0}
    with torch.no_grad():
        for layer, (d, m) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
            width = d.mlp.gate_proj.out_features // experts
            full = {
                "gate": d.mlp.gate_proj.dequantized_weight(),
                "up": d.mlp.up_proj.dequantized_weight(),
                "down": d.mlp.down_proj.dequantized_weight(),
            }
            for e in range(experts):
                expert = m.block_sparse_moe.experts.expert(e)
                rows = slice(e * width, (e + 1) * width)
                parts = {
                    "gate": (expert.w1.dequantized_weight(), full["gate"][rows]),
                    "up": (expert.w3.dequantized_weight(), full["up"][rows]),
                    "down": (expert.w2.dequantized_weight() / experts, full["down"][:, rows]),
                }
                for key, (mine, theirs) in parts.items():
                    diff = float((mine.float() - theirs.float()).abs().max())
                    worst[key] = max(worst[key], diff)
            del layer
    return worst


_KINDS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down",
          "w2": "down"}  # fmt: skip


def loss_sums(checkpoint: Path, experts: int) -> dict[str, float]:
    """The GPTQ layer losses of a checkpoint's MLP projections summed per kind (gate, up, down),
    from its quantlab_report.json. An expert's down projection holds 8x the dense weight, so its
    loss (``||(W - Q) X||^2 / n``) is divided by ``experts^2`` to be on the dense scale; the sum
    over experts then leaves out the cross-expert terms of the dense down's error."""
    report = json.loads((checkpoint / "quantlab_report.json").read_text())
    sums = {"gate": 0.0, "up": 0.0, "down": 0.0}
    for layer in report["layers"]:
        kind = _KINDS.get(layer["name"].rsplit(".", 1)[-1])
        if kind is None or layer["loss"] is None:
            continue
        scale = experts**2 if kind == "down" and ".experts." in layer["name"] else 1
        sums[kind] += layer["loss"] / scale
    return sums


def down_hessian_blocks(
    layers: tuple[int, ...], experts: int, windows: int = 16
) -> list[dict[str, float]]:
    """What per-expert calibration takes from GPTQ on a down projection, on the dense model: its
    GPTQ W4 g64 (act-order, clip search) with the full ``1536 x 1536`` Hessian against GPTQ of
    each expert's column block with only its diagonal block of it (what the MoEfied model's
    experts have), and RTN, all scored on the full Hessian (``windows x 512`` wiki-calib
    tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.calib.data import load_text, token_stream
    from quantlab.calib.stats import HessianAccumulator
    from quantlab.export.model_source import local_model_dir
    from quantlab.solvers.gptq import gptq_quantize
    from quantlab.solvers.hessian import proxy_loss
    from quantlab.solvers.rtn import rtn_quantize

    path, _ = local_model_dir("default")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tokenizer, load_text("wiki-calib"))[: windows * 512].view(windows, 512)
    options = {"bits": 4, "group_size": 64, "act_order": True, "clip_search": True}
    rows = []
    for index in layers:
        down = model.model.layers[index].mlp.down_proj
        stats = HessianAccumulator(down.in_features)
        handle = down.register_forward_pre_hook(lambda _m, args, acc=stats: acc.add(args[0]))
        with torch.no_grad():
            model(ids)
        handle.remove()
        hessian = stats.hessian().clone()
        weight = down.weight.detach()
        width = down.in_features // experts
        full = gptq_quantize(weight, hessian.clone(), **options).dequantize()
        per_block = torch.cat(
            [
                gptq_quantize(
                    weight[:, e * width : (e + 1) * width],
                    hessian[e * width : (e + 1) * width, e * width : (e + 1) * width].clone(),
                    **options,
                ).dequantize()
                for e in range(experts)
            ],
            dim=1,
        )
        rtn = rtn_quantize(weight, 4, 64).dequantize()
        rows.append(
            {
                "layer": index,
                "gptq_full_hessian": proxy_loss(weight, full, hessian),
                "gptq_expert_blocks": proxy_loss(weight, per_block, hessian),
                "rtn": proxy_loss(weight, rtn, hessian),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "moefied-bench")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--down-hessian-blocks",
        action="store_true",
        help="only measure GPTQ on dense down projections with the full Hessian vs its expert "
        "diagonal blocks (layers 0, 15, 29)",
    )
    parser.add_argument("extra", nargs="*", help="more `quantlab quantize` options (after --)")
    args = parser.parse_args(argv)
    if args.down_hessian_blocks:
        rows = down_hessian_blocks((0, 15, 29), args.experts)
        if args.markdown:
            print("| layer | GPTQ, full Hessian | GPTQ, expert blocks | ratio | RTN |")
            print("|---|---|---|---|---|")
            for r in rows:
                ratio = r["gptq_expert_blocks"] / r["gptq_full_hessian"]
                print(
                    f"| {r['layer']} | {r['gptq_full_hessian']:.3f} | "
                    f"{r['gptq_expert_blocks']:.3f} | {ratio:.2f} | {r['rtn']:.3f} |"
                )
        return 0

    from quantlab.export.model_source import local_model_dir
    from scripts.moefy import moefy

    dense_dir, _ = local_model_dir("default")
    moe_dir = args.work / f"moefied-{args.experts}"
    if not (moe_dir / "config.json").is_file():
        moefy(dense_dir, moe_dir, args.experts)
    rows = []
    for method in args.methods:
        runs = {}
        for kind, model in (("dense", "default"), ("moe", moe_dir)):
            out = args.work / f"{kind}-{method}-w{args.bits}g{args.group_size}"
            result = quantize_with_cli(model, method, args.bits, args.group_size, out, args.extra)
            result["kind"] = kind
            print(json.dumps({k: v for k, v in result.items() if k != "layers"}), flush=True)
            runs[kind] = (result, out)
        dense, moe = runs["dense"][0], runs["moe"][0]
        row = {
            "method": method,
            "bits": args.bits,
            "group_size": args.group_size,
            "ppl_float_dense": dense["ppl_baseline"],
            "ppl_float_moe": moe["ppl_baseline"],
            "ppl_dense": dense["ppl"],
            "ppl_moe": moe["ppl"],
            "seconds_dense": dense["quantize_seconds"],
            "seconds_moe": moe["quantize_seconds"],
            "peak_rss_dense": dense["peak_rss_bytes"],
            "peak_rss_moe": moe["peak_rss_bytes"],
        }
        if method == "gptq":
            dense_losses = loss_sums(runs["dense"][1], args.experts)
            moe_losses = loss_sums(runs["moe"][1], args.experts)
            row["loss_ratio_moe_to_dense"] = {
                kind: moe_losses[kind] / dense_losses[kind] for kind in dense_losses
            }
        if method == "rtn":
            row["rtn_max_weight_diff"] = _rtn_weights_agree(
                runs["dense"][1], runs["moe"][1], args.experts
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        print(
            "| method | float ppl dense / MoE | quantized ppl dense | quantized ppl MoE | "
            "MoE vs dense | quantize s dense / MoE |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            change = 100 * (r["ppl_moe"] / r["ppl_dense"] - 1)
            print(
                f"| {r['method']} W{r['bits']} g{r['group_size']} | {r['ppl_float_dense']:.4f} / "
                f"{r['ppl_float_moe']:.4f} | {r['ppl_dense']:.4f} | {r['ppl_moe']:.4f} | "
                f"{change:+.2f} % | {r['seconds_dense']:.0f} / {r['seconds_moe']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
